"""Architectures (each one's head, stages and Grad-CAM layers) and exporting trained models (model_utils.py at the root
builds and loads them).
"""
