"""After Ctrl-C, Flower's reports of the Ray actors the interruption ended are not shown; other errors are.

Ctrl-C reaches every process of the terminal's group, so Ray's workers may die before the driver's
handler runs and Flower's worker threads log an ``ActorDiedError`` traceback first (seen in CI). The
filter holds such a record briefly and drops it only once the interruption is confirmed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from ray.exceptions import ActorDiedError

from simulations import simulate as sim

TRACEBACK = (
    'Traceback (most recent call last):\n  File "ray/_private/worker.py", line 1025, in get_objects\n'
    "    raise value\nray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."
)


def _record(msg: object) -> logging.LogRecord:
    return logging.LogRecord("flwr", logging.ERROR, __file__, 1, msg, None, None)


@pytest.fixture(autouse=True)
def _clear_flag() -> Iterator[None]:
    sim._INTERRUPTED.clear()
    yield
    sim._INTERRUPTED.clear()


@pytest.mark.parametrize("msg", [ActorDiedError(), TRACEBACK], ids=["exception", "traceback"])
def test_actor_death_dropped_when_the_interruption_follows(msg: object) -> None:
    keeper = sim._InterruptedActorFilter(grace=5.0)
    threading.Timer(0.2, sim._INTERRUPTED.set).start()  # the driver's handler runs after the report
    started = time.monotonic()
    assert keeper.filter(_record(msg)) is False
    assert time.monotonic() - started < 2.0  # released as soon as the interruption is known


@pytest.mark.parametrize("msg", [ActorDiedError(), TRACEBACK], ids=["exception", "traceback"])
def test_actor_death_without_interruption_is_logged_after_the_grace(msg: object) -> None:
    keeper = sim._InterruptedActorFilter(grace=0.3)
    started = time.monotonic()
    assert keeper.filter(_record(msg)) is True  # e.g. an actor killed for memory: the user must see it
    assert 0.25 <= time.monotonic() - started < 2.0


def test_other_errors_pass_at_once_even_when_interrupted() -> None:
    sim._INTERRUPTED.set()
    keeper = sim._InterruptedActorFilter(grace=5.0)
    started = time.monotonic()
    assert keeper.filter(_record("ClientApp raised ValueError: batch-size=0")) is True
    assert keeper.filter(_record(RuntimeError("out of memory"))) is True
    assert time.monotonic() - started < 0.5
