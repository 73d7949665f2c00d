"""Settings beyond their records (presets.py at the root holds those): the progressive-resizing schedule, the settings'
command line and docs/settings.md.
"""
