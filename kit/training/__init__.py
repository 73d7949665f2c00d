"""A training run: its story (training.py), the step, epoch, evaluation and schedules (engine.py), the training state
and last.pth (checkpoint.py), run folders (runs.py), the metrics.
"""
