"""A stage's stop request waits for the store write under way, never longer (distill/interrupts.py)."""

import os
import signal
import threading
import time

import pytest

from distill import interrupts
from distill.store import _retry_locked


@pytest.fixture
def stop_on_sigusr1():
    """SIGUSR1 asks for a stop, as Ctrl-C and SIGTERM do in a stage (stages/common.py)."""
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: interrupts.stop())
    yield lambda: os.kill(os.getpid(), signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, previous)


def test_a_stop_inside_a_store_call_is_raised_once_the_call_is_whole(stop_on_sigusr1):
    done = []

    def write():
        stop_on_sigusr1()  # the handler runs at the next bytecode, inside this call
        done.append("first half")
        done.append("second half")
        return "written"

    with pytest.raises(KeyboardInterrupt):
        _retry_locked(write)
    assert done == ["first half", "second half"]
    assert _retry_locked(lambda: "next") == "next"  # the stop was raised once, not kept


def test_a_stop_outside_a_store_call_is_raised_at_once_and_one_inside_a_failing_call_replaces_its_error(
        stop_on_sigusr1):
    done = []
    with pytest.raises(KeyboardInterrupt):
        stop_on_sigusr1()
        done.append("after")
    assert done == []

    def failing():
        stop_on_sigusr1()
        raise OSError("disk full")

    with pytest.raises(KeyboardInterrupt) as stopped:
        _retry_locked(failing)
    assert isinstance(stopped.value.__context__, OSError)


def test_another_threads_store_call_defers_no_stop(stop_on_sigusr1):
    inside, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: _retry_locked(lambda: (inside.set(), release.wait(10))))
    worker.start()
    inside.wait(10)
    try:
        with pytest.raises(KeyboardInterrupt):
            stop_on_sigusr1()
            time.sleep(1)  # the main thread is in no section: the stop does not wait for the worker's call
    finally:
        release.set()
        worker.join()
