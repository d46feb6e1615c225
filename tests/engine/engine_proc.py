"""Drive a real `python -m engine serve` subprocess; every stdout line must be protocol."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time

from engine.protocol import EVENTS, decode


class EngineProcess:
    def __init__(self, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.events: queue.Queue = queue.Queue()
        self.stderr: list[bytes] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.events.put(decode(line, EVENTS))  # raises (and the test fails) on a bad line
        self.events.put(None)

    def send(self, type_, id_=None, **payload):
        obj = {"v": 1, "type": type_, **({"id": id_} if id_ else {}), **payload}
        self.write(json.dumps(obj))

    def write(self, line: str):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def next(self, timeout=120.0):
        msg = self.events.get(timeout=timeout)
        assert msg is not None, "engine closed stdout: " + b"".join(self.stderr[-20:]).decode()
        return msg

    def until(self, type_, id_=None, timeout=120.0):
        """Events up to and including the first of ``type_`` (and ``id_``)."""
        seen, end = [], time.monotonic() + timeout
        while True:
            msg = self.next(max(end - time.monotonic(), 0.01))
            seen.append(msg)
            if msg.type == type_ and (id_ is None or msg.id == id_):
                return seen

    def chat(self, id_, messages, **sampling):
        self.send(
            "generate",
            id_,
            messages=messages,
            # greedy, and not the demo's recommended repetition penalty (which the engine takes
            # where a request leaves it out)
            sampling={
                "temperature": 0,
                "repetition_penalty": 1.0,
                "max_new_tokens": 40,
                **sampling,
            },
        )
        events = self.until("finished", id_)
        text = "".join(m.get("text") for m in events if m.type == "delta" and m.id == id_)
        return text, events

    def long_answer_under_way(self, id_, max_new_tokens):
        """Ask for a long greedy story and return once three of its deltas have come."""
        self.send(
            "generate",
            id_,
            messages=[{"role": "user", "content": "Write a long story."}],
            sampling={"temperature": 0, "max_new_tokens": max_new_tokens},
        )
        deltas = 0
        while deltas < 3:
            deltas += self.next().type == "delta"

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
