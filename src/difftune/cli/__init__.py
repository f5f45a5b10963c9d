"""The command line's basics: user errors as one line and exit code 2, the argument parser, and the libraries'
messages a user cannot act on, dropped (quiet.py); a script's heavy modules, imported at first use (lazy.py), so
its --help answers at once.

The lowest layer: imports nothing else of difftune.
"""
