"""Structured logs: one JSON object a line, carrying the request's correlation id.

`RequestIdMiddleware` puts the id of the request being served in `request_id`; every record
logged while serving it carries it, whichever module logs.
"""

from __future__ import annotations

import asyncio
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


class LoopBatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines an event loop's callbacks log together, once the loop has run them
    (an access log line a request was a write, a syscall, a request). Warnings and worse, and
    lines logged off the loop's thread, are written at once, after any held before them; so
    are the held ones when logging flushes at exit."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        loop = asyncio._get_running_loop()  # None off a loop (get_running_loop raises)
        if loop is None or record.levelno >= logging.WARNING:
            self._write_held()
            super().emit(record)
            return
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._held.append(line)
        if len(self._held) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_held()
            super().flush()

    def _write_held(self) -> None:
        if self._held:
            lines, self._held = "".join(self._held), []
            try:
                self.stream.write(lines)
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": lines}))


def configure(level: str, log_format: str) -> None:
    """Log to stderr as JSON lines (`json`) or plain text (`text`)."""
    # No line logs its caller's file and line, thread or process: the logging HOWTO's
    # "Optimization", which spares every record a walk up the stack (an access log line a
    # request).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LoopBatchedHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
