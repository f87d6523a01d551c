"""Log lines: those logged on an event loop go out together once the loop has run its
callbacks; warnings, lines from elsewhere and the exit's flush are written at once, in order.
Access lines go straight to the installed handler only where nothing else would see them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from relay import logs
from relay.logs import LoopBatchedHandler, TextFormatter

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Recorded(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, Recorded]]:
    stream = Recorded()
    handler = LoopBatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"relay.test.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)


async def test_lines_logged_in_one_pass_of_the_loop_are_one_write(
        logged: tuple[logging.Logger, Recorded]) -> None:
    logger, stream = logged
    for n in range(3):
        logger.info("request %d", n)
    assert stream.writes == []  # held until the loop has run what is ready
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.writes == ["INFO request 0\nINFO request 1\nINFO request 2\n"]


async def test_a_warning_is_written_at_once_after_the_lines_held_before_it(
        logged: tuple[logging.Logger, Recorded]) -> None:
    logger, stream = logged
    logger.info("first")
    logger.warning("then this")
    assert stream.getvalue() == "INFO first\nWARNING then this\n"


async def test_lines_from_another_thread_are_written_at_once_in_order(
        logged: tuple[logging.Logger, Recorded]) -> None:
    logger, stream = logged
    logger.info("on the loop")
    thread = threading.Thread(target=logger.info, args=("from a thread",))
    thread.start()
    thread.join()
    assert stream.getvalue() == "INFO on the loop\nINFO from a thread\n"


async def test_lines_held_when_the_process_flushes_its_logs_are_written(
        logged: tuple[logging.Logger, Recorded]) -> None:
    logger, stream = logged
    logger.info("last words")
    for handler in logger.handlers:  # what logging.shutdown() does at exit
        handler.flush()
    assert stream.getvalue() == "INFO last words\n"


def test_off_a_loop_a_line_is_written_at_once(logged: tuple[logging.Logger, Recorded]) -> None:
    logger, stream = logged
    logger.info("plain")
    assert stream.writes == ["INFO plain\n"]


def test_text_lines_carry_an_rfc3339_time() -> None:
    line = TextFormatter().format(logging.makeLogRecord({"msg": "hi", "levelname": "INFO",
                                                         "name": "relay", "created": 0.0}))
    assert line == "1970-01-01T00:00:00.000Z INFO relay hi"


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], io.StringIO]]:
    """`logs.configure` as the gateway runs it, writing to a string instead of stderr; the root
    logger's handlers and level are put back afterwards (pytest's own included)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_installed", logs._installed)  # put back at teardown

    def configure(log_format: str) -> io.StringIO:
        stream = io.StringIO()
        monkeypatch.setattr("sys.stderr", stream)
        logs.configure("INFO", log_format)
        return stream

    yield configure
    root.handlers[:] = handlers
    root.setLevel(level)


async def flushed(stream: io.StringIO) -> list[str]:
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return stream.getvalue().splitlines()


async def test_an_access_line_in_json_carries_the_request_and_its_id(
        installed: Callable[[str], io.StringIO]) -> None:
    stream = installed("json")
    token = logs.request_id.set("req-1")
    try:
        logs.log_access("POST", "/intent/execute-wasm", 200, 1.25)
    finally:
        logs.request_id.reset(token)
    [line] = await flushed(stream)
    entry = json.loads(line)
    assert RFC3339.fullmatch(entry.pop("time"))
    assert entry == {"level": "info", "logger": "relay.access",
                     "message": "POST /intent/execute-wasm 200", "request_id": "req-1",
                     "method": "POST", "path": "/intent/execute-wasm", "status": 200,
                     "duration_ms": 1.25}


async def test_an_access_line_in_text_is_time_level_logger_message(
        installed: Callable[[str], io.StringIO]) -> None:
    stream = installed("text")
    logs.log_access("GET", "/healthz", 404, 0.5)
    [line] = await flushed(stream)
    time_part, rest = line.split(" ", 1)
    assert RFC3339.fullmatch(time_part) and rest == "INFO relay.access GET /healthz 404"


async def test_access_lines_skip_logging_records_only_where_nothing_else_would_see_them(
        installed: Callable[[str], io.StringIO], monkeypatch: pytest.MonkeyPatch) -> None:
    stream = installed("text")
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(factory(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(logging, "_logRecordFactory", counting)
    logs.log_access("GET", "/a", 200, 0.1)
    assert made == []  # the installed handler is the only way out: straight to it
    # Another handler on the way (a test's capture, a host application's): through logging,
    # so both get the line.
    other = Recorded()
    extra = logging.StreamHandler(other)
    access = logging.getLogger("relay.access")
    access.addHandler(extra)
    try:
        logs.log_access("GET", "/b", 200, 0.1)
    finally:
        access.removeHandler(extra)
    assert [record.getMessage() for record in made] == ["GET /b 200"]
    assert other.getvalue() == "GET /b 200\n"
    assert [line.split(" ", 1)[1] for line in await flushed(stream)] == [
        "INFO relay.access GET /a 200", "INFO relay.access GET /b 200"]


async def test_access_lines_obey_the_access_loggers_level_and_the_handlers_filters(
        installed: Callable[[str], io.StringIO]) -> None:
    stream = installed("text")
    access = logging.getLogger("relay.access")
    level = access.level
    access.setLevel(logging.WARNING)
    try:
        logs.log_access("GET", "/quiet", 200, 0.1)
    finally:
        access.setLevel(level)
    logging.getLogger().handlers[0].addFilter(
        lambda record: record.getMessage() != "GET /filtered 200")
    logs.log_access("GET", "/filtered", 200, 0.1)
    logs.log_access("GET", "/shown", 200, 0.1)
    assert [line.split(" ", 1)[1] for line in await flushed(stream)] == [
        "INFO relay.access GET /shown 200"]
