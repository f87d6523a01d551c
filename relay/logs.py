"""Structured logs: one JSON object a line, carrying the request's correlation id.

`RequestIdMiddleware` puts the id of the request being served in `request_id`; every record
logged while serving it carries it, whichever module logs.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import time
from typing import Any

from relay.schemas import encode, rfc3339

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                         default=None)
# Attributes every LogRecord has; anything else was passed with `extra=` and is logged too.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return self.line(record.created, record.levelname, record.name, record.getMessage(),
                         fields)

    def line(self, created: float, level: str, name: str, message: str,
             fields: dict[str, Any]) -> str:
        """The line of a record with these attributes (`fields`: those passed with `extra=`)."""
        entry: dict[str, Any] = {"time": rfc3339(created), "level": level.lower(),
                                 "logger": name, "message": message}
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        entry.update(fields)
        return encode(entry).decode("utf-8", "replace")


class TextFormatter(logging.Formatter):
    """`<time> <level> <logger> <message>`, the time as `rfc3339` writes it."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Formatter.format calls it, then adds the exception and stack, if any.
        return self.line(record.created, record.levelname, record.name, record.message, {})

    def line(self, created: float, level: str, name: str, message: str,
             fields: dict[str, Any]) -> str:
        """The line of a record with these attributes (`fields` are not shown)."""
        return f"{rfc3339(created)} {level} {name} {message}"


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
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._hold(line, loop)

    def write_line(self, line: str) -> None:
        """Write a line already formatted, as `emit` writes a record's (INFO and below)."""
        with self.lock:  # type: ignore[union-attr]
            loop = asyncio._get_running_loop()
            if loop is not None:
                self._hold(line, loop)
                return
            self._write_held()
            self.stream.write(line + self.terminator)
            self.flush()

    def _hold(self, line: str, loop: asyncio.AbstractEventLoop) -> None:
        self._held.append(line + self.terminator)
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
    global _installed
    handler = _installed = LoopBatchedHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


_installed: LoopBatchedHandler | None = None
"""The handler `configure` installed."""
access = logging.getLogger("relay.access")


def log_access(method: str, path: str, status: int, duration_ms: float) -> None:
    """One access line: `relay.access` logs `<method> <path> <status>` at INFO, with those and
    `duration_ms` as fields. When the line would go to the handler `configure` installed and
    nowhere else (no other handler, filter or level in its way: the usual case), it is
    formatted and handed to that handler directly. A gateway writes one a request, and
    Python's logging machinery (the record, the handler chain) cost more than the line itself:
    5.5 % of the gateway's instructions a sync execute (`bench/bench_instructions.py`).
    Otherwise (a test capturing logs, a host application's handlers) it goes through
    logging."""
    fields = {"method": method, "path": path, "status": status, "duration_ms": duration_ms}
    message = f"{method} {path} {status}"
    handler = _sole_handler(access)
    if handler is None:
        access.info("%s", message, extra=fields)
        return
    handler.write_line(handler.formatter.line(  # type: ignore[union-attr]
        time.time(), "INFO", access.name, message, fields))


def _sole_handler(logger: logging.Logger) -> LoopBatchedHandler | None:
    """The handler `configure` installed, if an INFO record of `logger` would reach it and no
    other (checked as `Logger.handle` and `Logger.callHandlers` decide), and it formats with
    one of the formatters above."""
    handler = _installed
    if (handler is None or logger.disabled or logger.filters or handler.filters
            or not logger.isEnabledFor(logging.INFO) or handler.level > logging.INFO
            or not isinstance(handler.formatter, (JsonFormatter, TextFormatter))):
        return None
    node: logging.Logger | None = logger
    while node is not None:
        if node.handlers:
            return handler if node.handlers == [handler] and node.parent is None else None
        if not node.propagate:
            return None
        node = node.parent
    return None
