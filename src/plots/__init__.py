"""Figures (matplotlib, Agg backend): each function writes one PNG and returns its path; base.py holds what the
family modules share."""
from .flips import cka_heatmap, flip_heatmap, flips_vs_acc_diff, per_class_flips_plot  # noqa: F401
