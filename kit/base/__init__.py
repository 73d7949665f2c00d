"""What every room stands on: the kit's errors and command-line wrapper, atomic file writes, torchrun plumbing, device
and precision choice.
"""
