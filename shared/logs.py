"""One logging set-up for every fedq entry point: fedq's own lines at the level asked for, other
libraries' (pika, urllib3, PIL, matplotlib, ...) at WARNING unless asked for more.

fedq's loggers are named after its modules (logging.getLogger(__name__)), so they are the ones
under its top-level packages; every other logger inherits the root's level, which is the
libraries' level.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shared.errors import ConfigError

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# The top-level packages whose loggers are fedq's own ("__main__": a module run as a script).
FEDQ_LOGGERS = ("shared", "broker", "aggregator", "worker", "__main__")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LIBRARY_LEVEL = "WARNING"


def add_logging_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """--log-level (fedq's own lines; FEDQ_LOG_LEVEL) and --library-log-level (every other
    library's: pika, urllib3, ...; FEDQ_LIBRARY_LOG_LEVEL)."""
    parser.add_argument(
        "--log-level",
        default=os.environ.get("FEDQ_LOG_LEVEL", default),
        help=f"fedq's log lines: {', '.join(LEVELS)} (default {default})",
    )
    parser.add_argument(
        "--library-log-level",
        default=os.environ.get("FEDQ_LIBRARY_LOG_LEVEL", DEFAULT_LIBRARY_LEVEL),
        help=f"other libraries' log lines, pika's among them (default {DEFAULT_LIBRARY_LEVEL})",
    )


def log_level(text: str | int, flag: str = "--log-level") -> int:
    """A level name (any case) or number as logging's number; an unknown name is a ConfigError."""
    if isinstance(text, int):
        return text
    name = text.strip().upper()
    if name not in LEVELS:
        raise ConfigError(f"{flag} must be one of {', '.join(LEVELS)}, got {text!r}")
    return int(getattr(logging, name))


def configure_logging(level: str | int, library_level: str | int = DEFAULT_LIBRARY_LEVEL) -> None:
    """Send log lines to stderr: fedq's at `level`, every other library's at `library_level`.

    Safe to call again (a later call sets the levels anew and adds no second handler); where the
    root logger already has handlers (an application embedding fedq, pytest) they are kept.
    """
    ours, theirs = log_level(level), log_level(library_level, "--library-log-level")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(theirs)
    for name in FEDQ_LOGGERS:
        logging.getLogger(name).setLevel(ours)
