"""conftest.gpu_lock: how GPU tests in pytest-xdist workers share the GPU."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import fcntl, gpu_lock


@pytest.mark.skipif(fcntl is None, reason="no flock on this system")
def test_a_gpu_alone_test_waits_for_running_tests_and_goes_before_newer_ones(tmp_path):
    events: list[str] = []
    release = {name: threading.Event() for name in "ABC"}

    def hold(name: str, alone: bool) -> None:
        with gpu_lock(tmp_path, alone):
            events.append(f"{name} in")
            release[name].wait(10)
            events.append(f"{name} out")

    a = threading.Thread(target=hold, args=("A", False))
    b = threading.Thread(target=hold, args=("B", True))
    c = threading.Thread(target=hold, args=("C", False))
    a.start()
    while events != ["A in"]:
        time.sleep(0.01)
    b.start()  # waits for A
    time.sleep(0.3)
    c.start()  # would join A at once, but B came first
    time.sleep(0.3)
    assert events == ["A in"]
    release["A"].set()
    release["B"].set()
    release["C"].set()
    for t in (a, b, c):
        t.join(10)
    assert events == ["A in", "A out", "B in", "B out", "C in", "C out"]
