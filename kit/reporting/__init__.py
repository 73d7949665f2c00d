"""What a run shows: console lines and summary.json, the self-contained report pages, plots, Grad-CAM, and the
baselines bench.py measures against.
"""
