"""longvila: long-context video language models the way LongVILA trains and runs them."""

__version__ = "0.1.0"
