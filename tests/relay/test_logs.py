"""Log lines: those logged on an event loop go out together once the loop has run its
callbacks; warnings, lines from elsewhere and the exit's flush are written at once, in order."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Iterator

import pytest

from relay.logs import LoopBatchedHandler, TextFormatter


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
