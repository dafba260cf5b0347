"""Logging set up in one place: a terse console format for people, a detailed file for forensics.

Log what a data engineer needs (counts, reasons, where outputs went, durations). Never log
patient names, references, birth dates or pixel data.
"""

from __future__ import annotations

import logging
import logging.config
import os
import warnings
from pathlib import Path


def configure_logging(
    level: int = logging.INFO, log_file: Path | None = None, console: bool = True
) -> None:
    """Configure the root logger once for the command line.

    Args:
        level: console level.
        log_file: detailed log file; defaults to ``$OSTEO_LOG_FILE`` when set.
        console: also log to standard error.
    """
    log_file = log_file or (
        Path(os.environ["OSTEO_LOG_FILE"]) if "OSTEO_LOG_FILE" in os.environ else None
    )
    handlers: dict[str, dict[str, object]] = {}
    if console:
        handlers["console"] = {
            "class": "logging.StreamHandler", "formatter": "terse", "level": level,
        }
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers["file"] = {
            "class": "logging.handlers.RotatingFileHandler",
            "filename": str(log_file),
            "maxBytes": 10_000_000,
            "backupCount": 5,
            "formatter": "detailed",
            "level": logging.DEBUG,
        }
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "terse": {"format": "%(levelname)-7s %(message)s"},
                "detailed": {"format": "%(asctime)s %(levelname)s %(name)s:%(lineno)d %(message)s"},
            },
            "handlers": handlers,
            "root": {"handlers": list(handlers), "level": logging.DEBUG if log_file else level},
        }
    )
    # Third-party chatter that says nothing a data engineer can act on.
    noisy_libraries = ("botocore", "boto3", "s3transfer", "urllib3", "great_expectations",
                       "fsspec", "websockets", "httpx", "httpcore", "asyncio", "aiosqlite",
                       "matplotlib", "PIL")
    for noisy in noisy_libraries:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
