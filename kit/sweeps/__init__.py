"""Hyperparameter sweeps' library: the search space and the report of a study (sweep.py at the root is the command).
"""
