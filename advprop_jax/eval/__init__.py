"""Evaluation: one eval step (step.py), one loop summing it over a dataset (loop.py), one table of
evaluators (evaluators.py) used by the training loop and by the `evaluate` CLI, robustness metrics
(robustness.py) and reports (report.py)."""
