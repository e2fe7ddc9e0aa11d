"""The `uora-rt` subcommands: each module has add_arguments(parser) and run(args).

Kept light at import time (heavy imports happen inside run) so `uora-rt --help` stays fast.
"""
