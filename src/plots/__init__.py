"""Figures (matplotlib, Agg backend): each function writes one PNG and returns its path."""
from .flips import flip_heatmap, flips_vs_acc_diff, per_class_flips_plot  # noqa: F401
