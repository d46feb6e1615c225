"""EngineClient: owns the ``python -m engine serve`` subprocess and speaks engine/protocol.py.

Pure asyncio (it runs on the Qt event loop through qasync, but holds no Qt object). Each
generate request gets an asyncio.Queue of protocol messages that ends with its ``finished``.
When the engine dies unexpectedly, every open request ends with an error, the engine is
restarted and the last model reloaded; the conversation lives in the GUI, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.protocol import EVENTS, PROTOCOL_VERSION, Message, ProtocolError, decode, encode

log = logging.getLogger("app.engine")
StateCallback = Callable[[str, dict[str, Any]], None]
STATES = ("stopped", "starting", "ready", "loading", "loaded", "crashed", "failed")


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


class EngineError(Exception):
    """An error the engine reported (load failures, bad requests) or a dead engine; ``kind`` is
    the protocol's error kind where there is one ("crashed", "stopped": the process ended)."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


# Error kinds of requests the engine's exit ended; the client's own state tells of the exit.
PROCESS_ENDED = ("crashed", "stopped")


class EngineClient:
    def __init__(
        self,
        command: list[str] | None = None,
        log_path: Path | None = None,
        on_state: StateCallback | None = None,
        max_restarts: int = 3,
        env: dict[str, str] | None = None,
    ):
        self.command = command or [sys.executable, "-m", "engine", "serve"]
        self.log_path = log_path
        self.on_state = on_state or (lambda state, info: None)
        self.max_restarts = max_restarts
        self.env = env
        self.state = "stopped"
        self.hello: dict[str, Any] = {}
        self.loaded: dict[str, Any] = {}
        # the load request of the model loaded now ({} while none is): what a refused load
        # leaves to reload after a crash where the engine kept that model
        self.loaded_from: dict[str, Any] = {}
        self.last_load: dict[str, Any] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[str, asyncio.Future] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._progress: dict[str, Callable[[float, str], None]] = {}
        self._hello: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None
        self._closing = False
        self._restarts: list[float] = []
        # Done when the restart after a crash (start and reload) is over: requests made
        # meanwhile wait for it instead of reaching the dead process.
        self._recovered: asyncio.Future | None = None
        # generate requests waiting for it: their queues and the tasks that send them
        self._unsent: dict[str, tuple[asyncio.Queue, asyncio.Task]] = {}
        self._shutdowns = 0  # a restart that sees this change stops short of its reload

    @property
    def pid(self) -> int | None:
        """The engine process's id (NVML's per-process memory is read by it), None before
        the first start."""
        return self.proc.pid if self.proc is not None else None

    @property
    def closing(self) -> bool:
        """Being stopped (shutdown, or a start that kills a process left behind)."""
        return self._closing

    def _set_state(self, state: str, **info: Any) -> None:
        self.state = state
        self.on_state(state, info)

    # -- process -------------------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Start the engine and wait for its hello (a process left from a start that timed out
        is killed first)."""
        if self.proc is not None and self.proc.returncode is None:
            self._closing = True  # its end is not a crash
            self.proc.kill()
            await self.proc.wait()
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
        self._closing = False
        self._set_state("starting")
        stderr = open(self.log_path, "ab") if self.log_path else asyncio.subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, **(self.env or {}), PYTHONUNBUFFERED="1")
        proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
            limit=16 << 20,
        )
        if stderr is not asyncio.subprocess.DEVNULL:
            stderr.close()
        if self._closing:  # shutdown() began while the process was made
            proc.kill()
            await proc.wait()
            raise EngineError("the engine was stopped while it started", "stopped")
        self.proc = proc
        self._hello = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(self.proc))
        try:
            hello = await asyncio.wait_for(self._hello, timeout=120)
        except (asyncio.TimeoutError, EngineError) as e:
            if self._closing:  # stopped by shutdown(), which tells the state
                raise EngineError("the engine was stopped while it started", "stopped") from e
            self._set_state("failed", message=self._explain(f"the engine did not start ({e})"))
            raise EngineError(self._explain("the engine did not start")) from e
        self.hello = hello
        self._send("hello", version=PROTOCOL_VERSION)
        self._set_state("ready", **hello)
        return hello

    def _explain(self, what: str) -> str:
        return f"{what}; details are in {self.log_path}" if self.log_path else what

    def _send(self, type_: str, id_: str | None = None, **payload: Any) -> None:
        if self.proc is None or self.proc.stdin is None or self.proc.returncode is not None:
            raise EngineError("the engine is not running")
        self.proc.stdin.write(encode(type_, id_, **payload).encode("utf-8"))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                msg = decode(line, EVENTS)
            except ProtocolError as e:
                log.error("bad line from the engine: %s", e)
                continue
            self._dispatch(msg)
        await proc.wait()
        if proc is self.proc and not self._closing:
            await self._crashed(proc.returncode)

    def _dispatch(self, msg: Message) -> None:
        if msg.type == "hello" and self._hello is not None and not self._hello.done():
            self._hello.set_result(msg.payload)
        elif msg.id in self._queues:
            self._queues[msg.id].put_nowait(msg)
            if msg.type == "finished":
                del self._queues[msg.id]
        elif msg.type == "load_progress":  # not the load's answer, with or without a callback
            if msg.id in self._progress:
                self._progress[msg.id](msg.get("fraction", 0.0), msg.get("stage", ""))
        elif msg.id in self._waiters:
            waiter = self._waiters.pop(msg.id)
            if not waiter.done():
                waiter.set_result(msg)
        elif msg.type == "error":
            log.error("engine error: %s", msg.payload)

    @staticmethod
    def _end(queue: asyncio.Queue, id_: str, kind: str, why: str) -> None:
        queue.put_nowait(Message("error", id_, {"kind": kind, "message": why}))
        queue.put_nowait(Message("finished", id_, {"reason": "error", "stats": {}}))

    def _end_requests(self, kind: str, why: str) -> None:
        """Every request sent to the engine ends with an error (kind, why): its queue with that
        and ``finished``, its waiter with that."""
        for id_, queue in list(self._queues.items()):
            self._end(queue, id_, kind, why)
        self._queues.clear()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(Message("error", None, {"kind": kind, "message": why}))
        self._waiters.clear()

    async def _crashed(self, code: int | None) -> None:
        why = self._explain(f"the engine stopped unexpectedly (exit code {code})")
        log.error(why)
        self._end_requests("crashed", why)
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(EngineError(why))
            return
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 300] + [now]
        if len(self._restarts) > self.max_restarts:
            self._set_state(
                "failed",
                message=f"{why}; it crashed {_times(len(self._restarts))} in 5 minutes, "
                "so it was not restarted",
            )
            return
        self._set_state("crashed", message=why)
        reload, shutdowns = self.last_load, self._shutdowns
        recovered = self._recovered = asyncio.get_running_loop().create_future()
        try:
            await self.start()
            if self._shutdowns != shutdowns:  # the app closes, or Restart engine
                return
            if reload is not None and self.last_load is reload:  # else the user loads another
                await self._load(reload)
        except EngineError as e:
            if e.kind != "stopped":  # else shutdown() ended it
                log.error("restart failed: %s", e)
        finally:
            recovered.set_result(None)  # a crash during the reload has begun another

    @property
    def recovering(self) -> bool:
        """Whether a restart after a crash is under way."""
        return self._recovered is not None and not self._recovered.done()

    async def _after_recovery(self) -> None:
        """Waits out a restart after a crash, where one is under way (and the next one, where
        the engine crashed again meanwhile)."""
        while self.recovering:
            await asyncio.shield(self._recovered)

    # -- requests ------------------------------------------------------------------------------
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def _request(self, type_: str, timeout: float | None = None, **payload: Any) -> Message:
        """The engine's answer to a request; EngineError where it answers with an error, or
        ends before it answers (kind "crashed" or "stopped")."""
        id_ = self._new_id(type_)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[id_] = waiter
        self._send(type_, id_, **payload)
        msg = await asyncio.wait_for(waiter, timeout)
        if msg.type == "error":
            raise EngineError(
                msg.get("message", f"the engine could not do {type_}"), msg.get("kind", "")
            )
        return msg

    async def load(
        self,
        path: str,
        device: str | None = None,
        dtype: str | None = None,
        max_seq_len: int = 4096,
        on_progress: Callable[[float, str], None] | None = None,
    ) -> dict[str, Any]:
        """Load a model; returns the ``loaded`` payload or raises EngineError with the reason.
        Made while the engine restarts after a crash, it waits for the restart and takes the
        place of its reload."""
        self.last_load = dict(
            path=path, device=device, dtype=dtype, max_seq_len=max_seq_len, on_progress=on_progress
        )
        await self._after_recovery()
        return await self._load(self.last_load)

    async def _load(self, request: dict[str, Any]) -> dict[str, Any]:
        """``request``: load()'s arguments (last_load)."""
        self._set_state("loading", path=request["path"])
        id_ = self._new_id("load")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[id_] = waiter
        if request["on_progress"]:
            self._progress[id_] = request["on_progress"]
        payload = {k: request[k] for k in ("path", "max_seq_len")}
        payload.update({k: request[k] for k in ("device", "dtype") if request[k]})
        try:
            self._send("load", id_, **payload)
            msg = await waiter
        finally:
            self._progress.pop(id_, None)
        if msg.type == "error":
            kind = msg.get("kind", "")
            # refused before the engine let its model go: that model stays (the engine sends
            # model_kept only with one loaded, which this client has heard of by now: a load
            # made while another was loading is answered after it)
            if msg.get("model_kept") and self.loaded:
                self.last_load = self.loaded_from
                self._set_state("loaded", **self.loaded)
            elif kind not in PROCESS_ENDED:  # else a restart may already be under way
                self.last_load = None
                self.loaded, self.loaded_from = {}, {}  # the engine let its model go
                self._set_state(
                    "ready" if self.proc and self.proc.returncode is None else "failed",
                    message=msg.get("message"),
                )
            raise EngineError(msg.get("message", "the model could not be loaded"), kind)
        self.loaded, self.loaded_from = msg.payload, request
        self._set_state("loaded", **msg.payload)
        return msg.payload

    def generate(
        self,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        sampling: dict[str, Any] | None = None,
        continue_final: bool = False,
    ) -> tuple[str, asyncio.Queue]:
        """Start a request; returns (id, queue of its events, ending with ``finished``). Made
        while the engine restarts after a crash, it is sent once the model is back.
        ``continue_final``: the last of ``messages`` is an answer to write more of."""
        id_ = self._new_id("gen")
        queue: asyncio.Queue = asyncio.Queue()
        payload: dict[str, Any] = {"sampling": sampling or {}}
        if messages is not None:
            payload["messages"] = messages
        if continue_final:
            payload["continue"] = True
        if prompt is not None:
            payload["prompt"] = prompt
        if self.recovering:
            task = asyncio.ensure_future(self._send_later(id_, queue, payload))
            self._unsent[id_] = (queue, task)
        else:
            self._send_request(id_, queue, payload)
        return id_, queue

    async def _send_later(self, id_: str, queue: asyncio.Queue, payload: dict[str, Any]) -> None:
        await self._after_recovery()
        del self._unsent[id_]
        self._send_request(id_, queue, payload)

    def _send_request(self, id_: str, queue: asyncio.Queue, payload: dict[str, Any]) -> None:
        """Sends generate request id_; a dead engine ends its queue with "not_running"."""
        self._queues[id_] = queue
        try:
            self._send("generate", id_, **payload)
        except EngineError as e:
            del self._queues[id_]
            self._end(queue, id_, "not_running", str(e))

    def cancel(self, id_: str) -> None:
        if id_ in self._unsent:  # still waiting for the restart: it ends here
            queue, task = self._unsent.pop(id_)
            task.cancel()
            queue.put_nowait(Message("finished", id_, {"reason": "cancelled", "stats": {}}))
            return
        with contextlib.suppress(EngineError):  # a dead engine has nothing left to cancel
            self._send("cancel", id_)

    async def unload(self, timeout: float = 60.0) -> None:
        """Let the loaded model go: the engine gives its memory back and stays running, ready
        for a load (a crash meanwhile restarts it without the model). The state is "ready" from
        the call on, so that nothing is sent to the model while it goes."""
        if self.state != "loaded":
            return
        self.last_load = None
        self.loaded, self.loaded_from = {}, {}
        self._set_state("ready")
        await self._request("unload", timeout)

    async def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        return (await self._request("stats", timeout)).payload

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine: one that answers is asked to exit and killed if it does not within
        ``timeout`` seconds; one still starting or loading a model has nothing to finish and is
        killed at once (a hung start or a long load no longer holds the app's exit). A restart
        after a crash that is under way ends with it, without its reload."""
        self._shutdowns += 1
        why = "the engine was stopped before it answered"
        for id_, (queue, task) in list(self._unsent.items()):  # waiting for a restart
            task.cancel()
            self._end(queue, id_, "stopped", why)
        self._unsent.clear()
        self._closing = True
        while True:
            proc = self.proc
            await self._stop(proc, timeout)
            if self._hello is not None and not self._hello.done():  # a start waiting for it
                self._hello.set_exception(EngineError(why, "stopped"))
            self._end_requests("stopped", why)
            # A restart under way ends now (its start or reload was stopped above); one that
            # had not yet made its process when this began has made it meanwhile: stop that too.
            await self._after_recovery()
            if self.proc is proc:
                break
        self._set_state("stopped")

    async def _stop(self, proc: asyncio.subprocess.Process | None, timeout: float) -> None:
        if proc is None or proc.returncode is not None:
            return
        if self.state not in ("starting", "loading"):
            with contextlib.suppress(EngineError, asyncio.TimeoutError, ConnectionError):
                self._send("shutdown")
                proc.stdin.close()
                await asyncio.wait_for(proc.wait(), timeout)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
