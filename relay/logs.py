"""Structured logs: one JSON object a line, carrying the request's correlation id.

`RequestIdMiddleware` puts the id of the request being served in `request_id`; every record
logged while serving it carries it, whichever module logs.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any

from relay.schemas import encode, rfc3339

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                         default=None)
# Attributes every LogRecord has; anything else was passed with `extra=` and is logged too.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return encode(entry).decode("utf-8", "replace")


class TextFormatter(logging.Formatter):
    """`<time> <level> <logger> <message>`, the time as `rfc3339` writes it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record.created)


def configure(level: str, log_format: str) -> None:
    """Log to stderr as JSON lines (`json`) or plain text (`text`)."""
    # No line logs its caller's file and line, thread or process: the logging HOWTO's
    # "Optimization", which spares every record a walk up the stack (an access log line a
    # request).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
