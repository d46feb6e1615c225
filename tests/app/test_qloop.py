"""app/event_loop.py: the Qt + asyncio loop of the app and of the GUI tests."""

import asyncio


def waiting_consumer(loop):
    """(queue, what it gave, task): a task that reads an asyncio.Queue as the chat reads the
    engine's events, left waiting on it (the queue bound to the loop)."""
    q, got = asyncio.Queue(), []

    async def consume():
        while True:
            got.append(await q.get())

    task = loop.create_task(consume())
    loop.run_until_complete(asyncio.sleep(0.01))
    return q, got, task


def test_a_task_resumed_as_the_loop_stops_keeps_reading_its_queue(qloop):
    """The chat reads the engine's events from an asyncio.Queue in a task: a task resumed
    while run_until_complete winds down must still be able to wait on it."""
    q, got, task = waiting_consumer(qloop)

    async def feed():  # the consumer wakes after the run has been told to stop
        qloop.call_soon(q.put_nowait, 1)

    qloop.run_until_complete(feed())
    q.put_nowait(2)
    qloop.run_until_complete(asyncio.sleep(0.05))
    assert got == [1, 2] and not task.done(), task.exception() if task.done() else got
    task.cancel()


def test_a_task_resumed_in_the_passes_pytest_qt_makes_between_tests_keeps_reading_its_queue(
    qloop,
):
    """pytest-qt processes Qt's events after each test, outside the loop (tests/app/conftest.py
    routes those passes to QtAsyncLoop.process_events): a chat's task that the engine's events
    resume there must still be able to wait on its queue. Plain processEvents killed it with
    "bound to a different event loop" (a test that ended mid-answer)."""
    import time

    import pytestqt.plugin

    q, got, task = waiting_consumer(qloop)
    for item in (1, 2):
        q.put_nowait(item)  # wakes the consumer in the next pass
        for _ in range(3):
            pytestqt.plugin._process_events()
            time.sleep(0.01)
    assert got == [1, 2] and not task.done(), task.exception() if task.done() else got
    task.cancel()
    qloop.run_until_complete(asyncio.sleep(0))


def test_daemon_threads_run_calls_in_order_at_most_n_at_once_and_never_hold_the_exit():
    """app/threads.py: what the downloads and the hub's calls run on."""
    import concurrent.futures
    import threading
    import time

    from app.threads import DaemonThreads

    pool = DaemonThreads(max_workers=2)
    gates = [threading.Event() for _ in range(4)]
    started, lock = [], threading.Lock()

    def call(i):
        with lock:
            started.append((i, threading.current_thread().daemon))
        gates[i].wait(10)
        if i == 1:
            raise ValueError("one")
        return i

    def until(n):
        end = time.monotonic() + 5
        while len(started) < n:
            assert time.monotonic() < end, started
            time.sleep(0.01)
        time.sleep(0.2)  # and no more start

    futures = [pool.submit(call, i) for i in range(4)]
    until(2)
    assert started == [(0, True), (1, True)]  # two at once, daemon threads
    gates[1].set()
    assert isinstance(futures[1].exception(5), ValueError)
    until(3)
    assert [i for i, _ in started] == [0, 1, 2]  # the next in the order submitted
    pool.shutdown(wait=False, cancel_futures=True)  # never waits; call 3 never starts
    gates[0].set()
    gates[2].set()
    assert futures[0].result(5) == 0 and futures[2].result(5) == 2
    concurrent.futures.wait([futures[3]], timeout=5)
    assert futures[3].cancelled()
    assert [i for i, _ in started] == [0, 1, 2]
    # without a bound: a thread a call
    free = DaemonThreads()
    assert free.submit(lambda: threading.current_thread().daemon).result(5) is True


def test_the_app_refuses_qasyncs_own_loop(qapp, tmp_path):
    """A script that drove the app on qasync.QEventLoop in slices (as wait_until does) saw 2
    answers in 4 stop for good: the chat's reader task died on its queue (the bug above)."""
    import pytest
    import qasync

    from app.__main__ import App

    loop = qasync.QEventLoop(qapp)
    try:
        with pytest.raises(TypeError, match=r"App runs on app\.event_loop\.QtAsyncLoop, not on"):
            App(tmp_path, model="demo", loop=loop)
    finally:
        loop.close()
    assert not (tmp_path / "history.sqlite3").exists()  # refused before it made anything
