"""app/event_loop.py: the Qt + asyncio loop of the app and of the GUI tests."""

import asyncio


def test_a_task_resumed_as_the_loop_stops_keeps_reading_its_queue(qloop):
    """The chat reads the engine's events from an asyncio.Queue in a task: a task resumed
    while run_until_complete winds down must still be able to wait on it."""
    q = asyncio.Queue()
    got = []

    async def consume():
        while True:
            got.append(await q.get())

    task = qloop.create_task(consume())
    qloop.run_until_complete(asyncio.sleep(0.01))  # the consumer waits, the queue is bound

    async def feed():  # the consumer wakes after the run has been told to stop
        qloop.call_soon(q.put_nowait, 1)

    qloop.run_until_complete(feed())
    q.put_nowait(2)
    qloop.run_until_complete(asyncio.sleep(0.05))
    assert got == [1, 2] and not task.done(), task.exception() if task.done() else got
    task.cancel()
