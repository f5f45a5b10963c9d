"""The command line's basics: user errors as one line and exit code 2, and the argument parser.

The lowest layer: imports nothing else of difftune.
"""
