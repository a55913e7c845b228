"""Evaluation: video needle in a haystack (`niah`), plots."""

from longvila.eval.niah import Needle, NiahGrid, normalise_answer, run_niah
from longvila.eval.plots import plot_niah_heatmap

__all__ = ["Needle", "NiahGrid", "normalise_answer", "plot_niah_heatmap", "run_niah"]
