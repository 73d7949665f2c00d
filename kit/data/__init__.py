"""Reading images: split lists and the one sampling plan every loader follows, writing splits, the DALI loader and the
device cache (data_utils.py at the root is the loaders' front and the torch loader).
"""
