"""The training loss curve as an inline SVG: the trainer's own chart (training/chart.py), so
the dashboard and the run directory's `loss.svg` are one drawing."""

from training.chart import loss_chart_svg

__all__ = ["loss_chart_svg"]
