"""``python -m engine serve``: the JSON-lines protocol of engine/protocol.py on stdin/stdout.

A reader thread parses stdin. ``cancel`` and ``stats`` are answered from that thread at once (a
cancel sets a flag the decode loop checks every step); everything else is queued for the main
thread, which loads models and generates one request at a time. The engine exits when stdin
closes or on a ``shutdown`` request. fd 1 is pointed at stderr so a stray print from a library
cannot corrupt the protocol.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue
import re
import sys
import threading
import traceback
from typing import IO, Any

from . import __version__
from .protocol import PROTOCOL_VERSION, REQUESTS, Message, ProtocolError, decode, encode

log = logging.getLogger("engine.server")
EOF = Message("eof")


class Server:
    def __init__(self, out: IO[str]):
        self.out = out
        self.lock = threading.Lock()
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.session = None
        self.model_name = ""
        self.gen = None
        self.gen_id: str | None = None
        self.cancelled: set[str] = set()  # ids cancelled before their generation began

    def send(self, type_: str, id_: str | None = None, **payload: Any) -> None:
        line = encode(type_, id_, **payload)
        with self.lock:
            self.out.write(line)
            self.out.flush()

    # -- reader thread -------------------------------------------------------------------
    def read(self, stdin: IO[bytes]) -> None:
        for raw in stdin:
            if not raw.strip():
                continue
            try:
                msg = decode(raw, REQUESTS)
            except ProtocolError as e:
                self.send("error", kind="protocol", message=str(e))
                continue
            if msg.type == "cancel":
                self.cancel(msg.id or msg.get("target"))
            elif msg.type == "stats":
                self.send("stats", msg.id, **self.stats())
            else:
                if msg.type == "shutdown":
                    self.cancel(self.gen_id)
                self.inbox.put(msg)
        self.cancel(self.gen_id)
        self.inbox.put(EOF)

    def cancel(self, id_: str | None) -> None:
        if id_ is None:
            return
        with self.lock:
            if self.gen is not None and self.gen_id == id_:
                self.gen.cancel()
            else:
                self.cancelled.add(id_)

    def stats(self) -> dict[str, Any]:
        s = self.session
        info: dict[str, Any] = {
            "model": self.model_name or None,
            "generating": self.gen_id,
            "pid": os.getpid(),
        }
        if s is not None:
            info.update(
                n_ctx=s.n_ctx,
                device=str(s.loaded.device),
                kernels=s.kernels,
                cached_tokens=len(s.cached),
                weight_bytes=s.loaded.weight_bytes,
            )
        info.update(memory_stats(s.loaded.device if s is not None else None))
        return info

    # -- main thread ---------------------------------------------------------------------
    def run(self) -> None:
        while True:
            msg = self.inbox.get()
            if msg is EOF or msg.type == "shutdown":
                return
            try:
                self.handle(msg)
            except Exception as e:  # the engine keeps serving whatever one request does
                log.error("request %s failed:\n%s", msg.type, traceback.format_exc())
                oom = _is_oom(e)
                if oom:
                    self.unload()  # what a failed load left behind goes back to the GPU
                # a load refused before it let the loaded model go (self.unload) leaves it
                kept = {"model_kept": True} if msg.type == "load" and self.session else {}
                kind = "oom" if oom else msg.type
                self.send("error", msg.id, kind=kind, message=_describe(e), **kept)

    def handle(self, msg: Message) -> None:
        if msg.type == "hello":
            version = msg.get("version")
            if version != PROTOCOL_VERSION:
                self.send(
                    "error",
                    kind="protocol",
                    message=f"app speaks protocol {version}, engine {PROTOCOL_VERSION}",
                )
                raise SystemExit(1)
        elif msg.type == "load":
            self.load(msg)
        elif msg.type == "unload":
            self.unload()
            self.send("stats", msg.id, **self.stats())
        elif msg.type == "generate":
            self.generate(msg)

    def load(self, msg: Message) -> None:
        from .config import ModelArgs
        from .generate import Session
        from .loader import DTYPES, check_device
        from .models import resolve_model

        name = msg.get("path") or msg.get("model") or "demo"
        device = msg.get("device") or _default_device()
        dtype = msg.get("dtype")
        max_seq_len = msg.get("max_seq_len") or 4096
        if not isinstance(name, str):
            raise ValueError(f"load: model {name!r} is not a folder, 'demo' or a repo id")
        if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise ValueError(f"load: device {device!r} is not one of cpu, cuda, cuda:N")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"load: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if type(max_seq_len) is not int or max_seq_len < 1:
            raise ValueError(f"load: max_seq_len {max_seq_len!r} is not a whole number of tokens")

        def progress(fraction: float, stage: str) -> None:
            self.send("load_progress", msg.id, fraction=round(fraction, 4), stage=stage)

        # What can be checked before the loaded model is let go: a GPU that is not there, a
        # name or folder that holds no model, a config the engine cannot read. Refused here,
        # the loaded model stays (the error says so: model_kept).
        try:
            check_device(device)
        except ValueError as e:
            raise ValueError(f"load: {e}") from None
        path = resolve_model(str(name), progress)
        ModelArgs.from_folder(path)
        self.unload()
        s = Session.load(path, device, DTYPES.get(dtype or ""), max_seq_len, progress)
        self.session, self.model_name = s, str(name)
        self.send(
            "loaded",
            msg.id,
            model=str(name),
            path=str(path),
            arch=s.loaded.args.arch,
            quant=s.loaded.quant,
            n_ctx=s.n_ctx,
            device=str(s.loaded.device),
            weight_bytes=s.loaded.weight_bytes,
            kv_cache_bytes=s.loaded.kv_bytes,
            workspace_bytes=s.loaded.workspace_bytes,
            layout_bytes=s.loaded.layout_bytes,
            host_weight_bytes=s.loaded.host_bytes,
            max_context=s.loaded.max_context,
            vram_bytes=memory_stats(s.loaded.device)["vram_bytes"],
            kernels=s.kernels,
            kernels_reason=s.kernels_reason,
            chat_template=s.tok.has_chat_template,
            dtype=str(s.loaded.model.model.norm.weight.dtype).removeprefix("torch."),
            note=s.loaded.note,
            sampling=s.recommended,
        )

    def unload(self) -> None:
        self.session, self.model_name = None, ""
        gc.collect()
        import torch

        if torch.cuda.is_available():
            # PyTorch keeps a 32 MiB cuBLAS workspace for each stream that ran a GEMM (six
            # after a load: 192 MiB held after the model was gone, session 35)
            torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.empty_cache()

    def generate(self, msg: Message) -> None:
        """Every generate request ends in exactly one ``finished`` event."""
        id_ = msg.id
        if id_ is None:
            raise ValueError("generate needs an 'id'")
        if id_ in self.cancelled:
            self.cancelled.discard(id_)
            self.send("finished", id_, reason="cancelled", stats={})
            return
        try:
            gen = self._start(msg)
        except Exception as e:
            kind = "not_loaded" if self.session is None else "request"
            self.send("error", id_, kind=kind, message=_describe(e))
            self.send("finished", id_, reason="error", stats={})
            return
        try:
            for text in gen:  # with the answer's tokens so far: a piece may hold several
                self.send("delta", id_, text=text, tokens=len(gen.tokens))
            self.send("finished", id_, reason=gen.reason, stats=gen.stats.as_dict())
        except Exception as e:
            log.error("generation %s failed:\n%s", id_, traceback.format_exc())
            self.send("error", id_, kind="generate", message=_describe(e))
            self.send("finished", id_, reason="error", stats=gen.stats.as_dict())
        finally:
            with self.lock:
                self.gen, self.gen_id = None, None

    def _start(self, msg: Message):
        from .sampling import SamplingParams

        s = self.session
        if s is None:
            raise ValueError("no model is loaded: load one first")
        sampling, prompt = msg.get("sampling") or {}, msg.get("prompt")
        continue_final = msg.get("continue", False)
        if not isinstance(continue_final, bool):
            raise ValueError(f"'continue' must be true or false, not {continue_final!r}")
        if not isinstance(sampling, dict):
            raise ValueError(f"'sampling' must be an object of settings, not {sampling!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string, not {prompt!r}")
        sampling = dict(sampling)
        if msg.get("stop"):  # a list of strings, checked with the rest of the sampling
            sampling["stop"] = msg.get("stop")
        # a setting the request leaves out: the model's recommended one, else the engine's
        params = SamplingParams.from_dict({**s.recommended, **sampling})
        ids, dropped = s.prompt_ids(
            messages=msg.get("messages"),
            prompt=prompt,
            max_new_tokens=params.max_new_tokens,
            continue_final=continue_final,
        )
        gen = s.generate(ids, params, dropped)
        with self.lock:
            self.gen, self.gen_id = gen, msg.id
            if msg.id in self.cancelled:
                self.cancelled.discard(msg.id)
                gen.cancel()
        self.send(
            "started", msg.id, prompt_tokens=len(ids), dropped_messages=dropped, n_ctx=s.n_ctx
        )
        return gen


def _describe(e: Exception) -> str:
    if isinstance(e, ValueError | OSError | MemoryError):
        return str(e)
    if _is_oom(e):  # torch's own: keep its first line, which has the sizes
        return f"out of GPU memory: {str(e).splitlines()[0]}"
    return f"{type(e).__name__}: {e}"


def _is_oom(e: Exception) -> bool:
    import torch

    return isinstance(e, MemoryError | torch.cuda.OutOfMemoryError)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_info() -> dict[str, Any]:
    """What the hello tells the app before any load: CUDA devices (with UUIDs, to match NVML's
    list) and whether the CUDA kernels can be used, or why not."""
    import torch

    from . import ops

    cuda = torch.cuda.is_available()
    devices = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "index": i,
                "name": props.name,
                "uuid": str(getattr(props, "uuid", "")),
                "total_bytes": props.total_memory,
            }
        )
    kernels, why = ops.availability()
    return {
        "device": "cuda" if cuda else "cpu",
        "gpus": [d["name"] for d in devices],
        "cuda_devices": devices,
        "torch": torch.__version__,
        "kernels": kernels,
        "kernels_reason": why,
        "capabilities": ["vptq", "gptq", "dense", "cancel", "stats", "prefix_cache"],
    }


def memory_stats(device: Any = None) -> dict[str, Any]:
    """Host RSS, and what PyTorch holds on the model's GPU (``device``; None: the current one,
    which the reader thread that answers `stats` does not share with the main thread)."""
    import torch

    info: dict[str, Any] = {"rss_bytes": _rss_bytes(), "vram_bytes": 0}
    if torch.cuda.is_available():
        dev = device if device is not None and torch.device(device).type == "cuda" else None
        info["vram_bytes"] = torch.cuda.memory_allocated(dev)
        info["vram_reserved_bytes"] = torch.cuda.memory_reserved(dev)
    return info


def _rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _end_with_parent() -> None:
    """On Linux, have the kernel end this process when the one that started it (the app) ends:
    the end of stdin reaches a busy engine only when it next reads, so an app killed during a
    load left the engine holding the GPU until the load was over (a minute or more for 70B),
    and the next start's load found no room."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    # (A parent that ended before this call is not caught: the engine then reads the end of
    # its stdin at once, being idle.) The signal follows the thread that started the engine.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def serve(stdin: IO[bytes] | None = None) -> None:
    _end_with_parent()
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed to fd 1 now lands on stderr
    sys.stdout = sys.stderr
    out = os.fdopen(proto_fd, "w", encoding="utf-8", buffering=1)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    server = Server(out)
    server.send("hello", version=PROTOCOL_VERSION, engine=__version__, **device_info())
    reader = threading.Thread(target=server.read, args=(stdin or sys.stdin.buffer,), daemon=True)
    reader.start()
    server.run()
    # After a shutdown request the reader thread is still in a read of stdin (or answering a
    # stats request), and the interpreter's exit aborted on it: "Fatal Python error:
    # _enter_buffered_busy: could not acquire lock for <stdin>", status -6, a core dump where
    # they are kept. Nothing is left to finish, so the process ends here, its output flushed.
    logging.shutdown()
    with server.lock:
        out.flush()
    sys.stderr.flush()
    os._exit(0)
