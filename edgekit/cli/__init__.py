"""The ``edgekit`` command: the only place that prints, parses argv or exits.

Reports go to stdout (``--json`` makes them machine-readable); logs and progress
go to stderr. An :class:`EdgekitError` becomes one line on stderr and exit code
2; ``--debug`` shows the traceback.

``app`` builds the parser and runs a command; each command group has its own module
(its options and what it prints); ``output`` holds the shared table and JSON helpers.
"""

from edgekit.cli.app import main

__all__ = ["main"]
