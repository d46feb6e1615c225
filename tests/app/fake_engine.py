"""A scripted engine that speaks the real protocol (engine/protocol.py), for GUI tests.

The last user message picks the behaviour: "crash" dies mid-answer ("crash late" after 20
words, 0.4 s), "slow" streams 400
words slowly (so stop can be tested), "fail" answers with an error event, anything else is
echoed back word by word after "You said:" (a message opening with a code fence, on the next
line, as a model writes a block); without a model loaded it refuses, as the real engine does.
Loading a path containing "bad" fails and lets the loaded model go ("missing" fails and keeps
it, "hang" never ends, "crash" kills the engine, "once" loads the first time only, as a folder
deleted while loaded; with "stuck" loaded, the engine hangs when asked to unload it, with
"sticky" loaded the unload fails with a CUDA error after the model went). Every request is
logged to $FAKE_ENGINE_LOG (one JSON line each) so tests can check what the app sent, and its
pid to $FAKE_ENGINE_PIDS. While the file $FAKE_ENGINE_HANG_START exists, the engine hangs before
its hello. $FAKE_ENGINE_CUDA (JSON) is the CUDA devices its hello lists (none by default).
"""

import json
import os
import sys
import threading
import time

from engine.protocol import REQUESTS, decode, encode

out = sys.stdout
cancelled: set[str] = set()
ANSWERING = "answering"  # cancels whichever answer is under way
inbox: list = []
cv = threading.Condition()
model = None  # the path of the model loaded now
loaded_once: set[str] = set()  # paths with "once" loaded before


def recommended(path) -> dict:
    """The sampling of the model folder's generation_config.json, as the real engine reads it
    (engine/sampling.py; without its checks, and without importing torch)."""
    try:
        with open(os.path.join(path, "generation_config.json")) as f:
            raw = json.load(f)
    except (OSError, TypeError, ValueError):
        return {}
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {k: v for k, v in raw.items() if k in keys}


def send(type_, id_=None, **payload):
    out.write(encode(type_, id_, **payload))
    out.flush()


def reader():
    for line in sys.stdin:
        msg = decode(line, REQUESTS)
        if os.environ.get("FAKE_ENGINE_LOG"):
            with open(os.environ["FAKE_ENGINE_LOG"], "a") as f:
                f.write(json.dumps({"type": msg.type, "id": msg.id, **msg.payload}) + "\n")
        with cv:
            if msg.type == "cancel":
                cancelled.add(msg.id)
            elif msg.type == "shutdown":  # as engine/server.py: the answer under way is cancelled
                cancelled.add(ANSWERING)
                inbox.append(msg)
            elif msg.type == "stats":  # on CUDA PyTorch's share too, as engine/server.py
                gpu = {"vram_reserved_bytes": 3 << 30} if os.environ.get("FAKE_ENGINE_CUDA") else {}
                send("stats", msg.id, model="fake", pid=os.getpid(), rss_bytes=1 << 20,
                     vram_bytes=0, **gpu)  # fmt: skip
            else:
                inbox.append(msg)
            cv.notify()
    with cv:
        inbox.append(None)
        cv.notify()


def generate(msg):
    if model is None:  # as engine/server.py: nothing loaded, or let go by a failed load
        send("error", msg.id, kind="generate", message="no model is loaded: load one first")
        return
    text = msg.get("messages")[-1]["content"]
    dropped = 3 if text.startswith("drop") else 0  # as if older turns no longer fit
    send(
        "started",
        msg.id,
        prompt_tokens=12 * len(msg.get("messages")),
        dropped_messages=dropped,
        n_ctx=2048,
    )
    if text == "fail":
        send("error", msg.id, kind="request", message="the fake engine refuses 'fail'")
        send("finished", msg.id, reason="error", stats={})
        return
    if text == "hang":  # stuck: it neither answers nor takes a cancel or a shutdown
        time.sleep(600)
    said = "You said:\n" if text.startswith("```") else "You said: "  # a fence opens a line
    words = ["word"] * 400 if text in ("slow", "crash late") else f"{said}{text}".split(" ")
    if msg.get("continue"):  # more of the answer that is the last message
        words = ["and", "more."]
    limit = (msg.get("sampling") or {}).get("max_new_tokens") or len(words)
    reason = "length" if len(words) > limit else "stop"
    words = words[:limit]
    for i, w in enumerate(words):
        if msg.id in cancelled or ANSWERING in cancelled:
            send("finished", msg.id, reason="cancelled", stats={"completion_tokens": i})
            return
        piece = (" " if i or msg.get("continue") else "") + w
        if text == "crash":  # each word two tokens (as a split character makes), counted as sent
            send("delta", msg.id, text=piece, tokens=2 * (i + 1))
        else:  # no count: as an engine that sends none
            send("delta", msg.id, text=piece)
        if (text, i) in (("crash", 2), ("crash late", 20)):
            os._exit(3)
        time.sleep(0.02 if text in ("slow", "crash", "crash late") else 0.001)
    send(
        "finished",
        msg.id,
        reason=reason,
        stats={
            "prompt_tokens": 12,
            "completion_tokens": len(words),
            "ttft_s": 0.05,
            "prefill_tok_s": 240.0,
            "decode_tok_s": 50.0,
            "dropped_messages": dropped,
        },
    )


def main():
    global model
    if os.environ.get("FAKE_ENGINE_PIDS"):
        with open(os.environ["FAKE_ENGINE_PIDS"], "a") as f:
            f.write(f"{os.getpid()}\n")
    hang = os.environ.get("FAKE_ENGINE_HANG_START")
    if hang and os.path.exists(hang):  # a start that never says hello
        time.sleep(600)
    cuda = json.loads(os.environ.get("FAKE_ENGINE_CUDA") or "[]")
    send(
        "hello",
        version=1,
        engine="fake",
        device="cuda" if cuda else "cpu",
        torch="2.13.0+cpu",
        gpus=[d["name"] for d in cuda],
        cuda_devices=cuda,
        kernels="reference",
        kernels_reason="the fake engine has no GPU",
        capabilities=[],
    )
    threading.Thread(target=reader, daemon=True).start()
    while True:
        with cv:
            while not inbox:
                cv.wait()
            msg = inbox.pop(0)
        if msg is None or msg.type == "shutdown":
            return
        if msg.type == "load":
            if "hang" in msg.get("path", ""):  # a load that never ends
                time.sleep(600)
            if "crash" in msg.get("path", ""):  # a load that kills the engine
                os._exit(3)
            if "bad" in msg.get("path", ""):  # refused after the loaded model was let go
                model = None
                send("error", msg.id, kind="load", message=f"{msg.get('path')}: no such model")
                continue
            if msg.get("path") in loaded_once:  # its folder was deleted after the first load
                model = None
                send("error", msg.id, kind="load", message=f"{msg.get('path')}: no such folder")
                continue
            if "once" in msg.get("path", ""):
                loaded_once.add(msg.get("path"))
            if "missing" in msg.get("path", ""):  # refused before: the loaded model stays
                kept = {"model_kept": True} if model else {}  # as engine/server.py: if any
                send("error", msg.id, kind="load", message=f"{msg.get('path')}: not found", **kept)
                continue
            if "slowload" in msg.get("path", ""):  # a step, then a pause the test looks into
                send("load_progress", msg.id, fraction=0.25, stage="reading weights")
                time.sleep(1.5)
            send("load_progress", msg.id, fraction=0.5, stage="loading weights")
            model = msg.get("path")
            send(
                "loaded",
                msg.id,
                model=msg.get("path"),
                n_ctx=2048,
                kernels="reference",
                kernels_reason="fake engine",
                quant="vptq",
                device=msg.get("device") or "cpu",
                weight_bytes=1 << 20,
                kv_cache_bytes=48 << 20,
                workspace_bytes=20 << 20,
                layout_bytes=2 << 20,
                host_weight_bytes=3 << 20,
                max_context=30720,
                vram_bytes=0,
                sampling=recommended(msg.get("path")),
            )
        elif msg.type == "unload":  # as engine/server.py: the model goes, stats answer
            if model and "stuck" in model:  # an engine that never gets to it
                time.sleep(600)
            sticky, model = model and "sticky" in model, None
            if sticky:  # as engine/server.py where emptying PyTorch's cache raises
                send(
                    "error", msg.id, kind="unload", message="CUDA error: unspecified launch failure"
                )
                continue
            send("stats", msg.id, model=None, generating=None, pid=os.getpid(), rss_bytes=0,
                 vram_bytes=0)  # fmt: skip
        elif msg.type == "generate":
            generate(msg)


if __name__ == "__main__":
    main()
