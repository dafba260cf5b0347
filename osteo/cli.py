"""The ``osteo`` command line: one entry point for data engineers, data scientists and auditors.

Each command ends with a summary a person can act on. User mistakes (a bad export, a missing
setting) end with one clear message and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging

import typer

from osteo.logs import configure_logging

app = typer.Typer(
    help="osteo: osteoporosis probability for X-rays, with patients' data kept private.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
logger = logging.getLogger(__name__)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """osteo: osteoporosis probability for X-rays, with patients' data kept private."""
    configure_logging(logging.DEBUG if verbose else logging.INFO)
