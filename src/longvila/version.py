"""The package version, in a leaf module so that code inside the package never imports the `longvila` facade."""

__version__ = "0.1.0"
