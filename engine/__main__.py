"""``python -m engine generate|chat|perplexity|serve|build-demo``."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path

# Before torch starts CUDA: growable segments, so a model that fills the card to within a few
# hundred MB is not refused for fragmentation (the 70B-in-22-GiB budget depends on it).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, MemoryError)


class ProgressLine:
    """Load progress on stderr: redrawn in place on a terminal, one line per stage otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.stage = ""
        self.open = False

    def __call__(self, fraction: float, stage: str) -> None:
        if self.tty:  # a new stage on a line of its own; the same one redrawn in place
            if self.open and stage != self.stage:
                print(file=sys.stderr)
            print(f"\r{stage}: {fraction:4.0%}", end="", file=sys.stderr, flush=True)
            self.open = True
        elif stage != self.stage:
            print(f"{stage}...", file=sys.stderr, flush=True)
        self.stage = stage

    def end(self) -> None:
        if self.open:
            print(file=sys.stderr)
            self.open = False


PROGRESS = ProgressLine()


def tokens(text: str) -> int:
    """An argparse type: a whole number of tokens, at least 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens, at least 1")
    return n


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N (the N-th GPU as CUDA numbers them)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, cuda:N")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="model folder, downloaded repo id, or 'demo'")
    p.add_argument(
        "--device", default="auto", type=device,
        help="where the model runs: auto (the first GPU where there is one), cpu, cuda or "
        "cuda:N (the N-th GPU)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"],
        help="activations' type (default: the checkpoint's on a GPU; float32 on the CPU, or "
        "bfloat16 where float32 would not fit the memory)",
    )  # fmt: skip
    p.add_argument("--context", type=tokens, default=4096, help="context length (tokens)")


# The sampling options: name, type, what it does, and its default where the model recommends
# nothing (its generation_config.json sets none: engine/sampling.py recommended_sampling).
SAMPLING_OPTIONS = [
    ("temperature", float, "0 means greedy", 0.7),
    (
        "top_p",
        float,
        "sample from the most likely tokens that hold this much probability (1: all)",
        1.0,
    ),
    ("top_k", int, "sample from the k most likely (0: off)", 0),
    ("min_p", float, "drop tokens less likely than this times the most likely one (0: off)", 0.0),
    (
        "repetition_penalty",
        float,
        "above 1, tokens already in the conversation get less likely (1: off)",
        1.0,
    ),
]
SAMPLING_DEFAULTS = {name: default for name, _, _, default in SAMPLING_OPTIONS}


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer")
    for name, kind, what, default in SAMPLING_OPTIONS:
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            help=f"{what} (default: the model's generation_config.json, else {default})",
        )
    p.add_argument("--seed", type=int, help="the same seed gives the same answer")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


class Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows an option's default where it has one (not "default: None")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        none = default is None or default is False or default in ([], argparse.SUPPRESS)
        return action.help or "" if none or not action.help else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every command's --help with the defaults (sub-commands are made of the same class)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, formatter_class=Defaults, **kwargs)


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m engine", description="VPTQ Chat engine")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream the completion of a prompt to stdout")
    _common(g)
    _sampling(g)
    g.add_argument(
        "text", nargs="?", help="the text to complete (or, with --chat, to answer); '-' or "
        "none with a pipe: read it from stdin",
    )  # fmt: skip
    g.add_argument("--prompt", help="the text, given as an option")
    g.add_argument("--chat", action="store_true", help="send the prompt as one user chat turn")
    c = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _common(c)
    _sampling(c)
    c.add_argument("--system", help="system prompt")
    pp = sub.add_parser("perplexity", help="perplexity of a text file")
    _common(pp)
    pp.add_argument("--file", required=True, type=Path, help="a UTF-8 text file")
    pp.add_argument("--max-tokens", type=tokens, default=4096, help="score at most this many")
    sub.add_parser("serve", help="the JSON-lines protocol on stdin/stdout (used by the app)")
    q = sub.add_parser("quantize", help="quantize a dense model into a VPTQ checkpoint")
    q.add_argument("--model", required=True, help="dense model folder, .gguf file, or 'demo'")
    q.add_argument(
        "--out", required=True, type=Path,
        help="the checkpoint's folder (an interrupted run there resumes)",
    )  # fmt: skip
    q.add_argument("--vector-len", type=int, default=4, help="weights per codebook entry (v)")
    q.add_argument(
        "--centroids", type=int, default=256,
        help="codebook entries, a power of two (bits per weight: log2(centroids) / v)",
    )  # fmt: skip
    q.add_argument(
        "--res-centroids", type=int, default=0,
        help="entries of a second, residual codebook (0: none)",
    )  # fmt: skip
    q.add_argument(
        "--method", choices=["rtn", "kmeans", "vptq"], default="vptq",
        help="vptq: Hessian-weighted, with error feedback; kmeans: plain k-means; rtn: "
        "round to the nearest entry of a fixed grid",
    )  # fmt: skip
    q.add_argument("--calibration", type=Path, help="a text file (default: shipped text)")
    q.add_argument(
        "--calib-sequences", type=int, default=32,
        help="calibration sequences, a multiple of 8 (half from the text, half sampled)",
    )  # fmt: skip
    q.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence")
    q.add_argument("--seed", type=int, default=0, help="the same seed gives the same checkpoint")
    q.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to quantize")
    bd = sub.add_parser("build-demo", help="build the embedded demo model now")
    bd.add_argument("--dense", action="store_true", help="only the dense demo (demo-dense)")
    sub.add_parser("build-kernels", help="build the CUDA kernels now (otherwise: on first use)")
    b = sub.add_parser("bench", help="benchmarks with baselines timed in the same run")
    bsub = b.add_subparsers(dest="bench", required=True)
    bk = bsub.add_parser("kernels", help="VPTQ kernels vs cuBLAS fp16 on Llama-3.1 layer shapes")
    bk.add_argument("--arch", action="append", help="llama-3.1-8b, llama-3.1-70b (default both)")
    bk.add_argument("--scheme", action="append", help="e.g. v8-k65536-0 (default: all six)")
    bk.add_argument(
        "--tokens", type=int, action="append", help="token counts (default: 1 4 8 16 512)"
    )
    bk.add_argument("--out", type=Path, help="also write every measurement as JSON here")
    bg = bsub.add_parser("gptq", help="the GPTQ kernel vs cuBLAS fp16 on Llama-3.1 layer shapes")
    bg.add_argument("--arch", action="append", help="llama-3.1-8b, llama-3.1-70b (default 8b)")
    bg.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4, help="bits per weight")
    bg.add_argument("--group", type=int, default=128, help="group size, or -1 (one group)")
    bg.add_argument("--act-order", action="store_true", help="a shuffled g_idx")
    bg.add_argument("--tokens", type=int, action="append", help="token counts (default: 1 4 8 512)")
    ba = bsub.add_parser(
        "attention", help="the decode step's attention at long contexts vs PyTorch SDPA"
    )
    ba.add_argument(
        "--arch", action="append",
        help="a model of bench e2e, for its heads (default: llama-3.1-8b and llama-3.1-70b)",
    )  # fmt: skip
    ba.add_argument(
        "--position", type=int, action="append",
        help="cache positions the query reads up to (default: 1024 4096 16384 32768)",
    )  # fmt: skip
    ba.add_argument(
        "--heads", action="append",
        help="also these heads: query heads/KV heads/head dim, e.g. 14/2/64 (Qwen2.5-0.5B)",
    )  # fmt: skip
    bs = bsub.add_parser(
        "sampling", help="the pick that ends a decode step: one kernel vs PyTorch's ops"
    )
    bs.add_argument(
        "--vocab", type=int, action="append",
        help="vocabulary sizes (default: 128256 of Llama 3 and 152064 of Qwen2.5)",
    )  # fmt: skip
    be = bsub.add_parser("e2e", help="a whole random model on the GPU: prefill, graph decode")
    be.add_argument("--arch", default="llama-3.1-8b", help="llama-3.1-8b|llama-3.1-70b|...")
    be.add_argument(
        "--scheme",
        default="v8-k65536-0",
        help="a VPTQ scheme (v8-k65536-0, ...) or a GPTQ one: gptq-4bit, gptq-4bit-act, "
        "gptq-3bit, gptq-2bit, gptq-8bit (group 128)",
    )
    be.add_argument("--context", type=tokens, default=4096, help="the KV cache's length")
    be.add_argument("--tokens", type=int, default=256, help="tokens to decode")
    be.add_argument("--vram-limit", type=float, help="cap torch's memory at this many GiB")
    be.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the decode step without each of its parts (what each part costs it)",
    )
    for group in (sub, bsub):  # "required: {kernels,gptq,...}", not "required: bench"
        group.metavar = "{" + ",".join(group.choices) + "}"
    return ap


def _params(a: argparse.Namespace, recommended: dict | None = None):
    """The options given, else what the model recommends, else SamplingParams' defaults (which
    SAMPLING_OPTIONS' help repeats: tests/engine/test_cli.py checks they agree)."""
    from .sampling import SamplingParams

    given = {k: getattr(a, k) for k in SAMPLING_DEFAULTS if getattr(a, k) is not None}
    p = SamplingParams(
        **((recommended or {}) | given), max_new_tokens=a.max_new_tokens, seed=a.seed, stop=a.stop
    )
    p.validate()
    return p


def _session(a: argparse.Namespace):
    import torch

    from .generate import Session
    from .loader import DTYPES
    from .models import resolve_model

    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_model(a.model, PROGRESS)
    s = Session.load(path, device, DTYPES.get(a.dtype or ""), a.context, PROGRESS)
    PROGRESS.end()
    print(f"loaded {path} on {device}; kernels: {s.kernels} ({s.kernels_reason})", file=sys.stderr)
    lm = s.loaded
    if lm.note:
        print(f"note: {lm.note}", file=sys.stderr)
    if lm.device.type == "cuda":
        print(
            f"GPU memory: weights {lm.weight_bytes / 2**30:.2f} GiB, fast decode layout "
            f"{lm.layout_bytes / 2**30:.2f} GiB ({lm.sliced_layers[0]} of "
            f"{lm.sliced_layers[1]} layers), KV cache "
            f"{lm.kv_bytes / 2**30:.2f} GiB, workspace {lm.workspace_bytes / 2**30:.2f} GiB; "
            f"the largest context that fits is {lm.max_context} tokens"
            + (
                f"; the embedding table ({lm.host_bytes / 2**30:.2f} GiB) stays in host memory"
                if lm.host_bytes
                else ""
            ),
            file=sys.stderr,
        )
    return s


# How an answer ended, in the words the chat window uses (app/ui/chat_view.py).
ENDINGS = {"stop": "done", "length": "cut at the token limit", "cancelled": "stopped"}


# What `generate` says where the model ended its text at once, so that an empty output is not
# taken for a failure: without --chat, for a model with a chat template, how to have it answer
# (an instruct model given a bare question, the README's first try, ends it there).
ENDED = "the model ended the text at once (its first token was its end of text)"
ENDED_AT_ONCE = (
    "the model ended the text at once (nothing to add to it): to have an instruct model answer "
    "a question or an instruction, add --chat"
)


def _stream(gen, ended_at_once: str = ENDED) -> None:
    """Prints the answer as it comes, then how it ended; ``ended_at_once``: what to say where the
    model ended before writing anything."""
    wrote = False
    for text in gen:
        wrote = wrote or bool(text)
        sys.stdout.write(text)
        sys.stdout.flush()
    st = gen.stats
    ending = ENDINGS.get(gen.reason, gen.reason)
    # a follow-up reads only its new tokens (the rest is reused from the KV cache): said, so
    # that its rate, mostly a step's fixed cost for a few tokens, is not read as a slow prefill
    reused = f" ({st.cached_tokens} reused)" if st.cached_tokens else ""
    print(
        f"\n[{ending}] {st.completion_tokens} tokens, TTFT {st.ttft_s * 1000:.0f} ms, "
        f"prefill {st.prompt_tokens - st.cached_tokens} tokens{reused} at "
        f"{st.prefill_tok_s:.1f} tok/s, decode {st.decode_tok_s:.1f} tok/s",
        file=sys.stderr,
    )
    if ended_at_once and not wrote and gen.reason == "stop":
        print(f"note: {ended_at_once}", file=sys.stderr)


def _prompt(a: argparse.Namespace) -> str:
    """The text to complete: the argument, --prompt, or stdin ('-', or a pipe and neither)."""
    if a.text is not None and a.prompt is not None:
        raise ValueError("the text is given twice (as an argument and as --prompt): give one")
    text = a.prompt if a.prompt is not None else a.text
    if text == "-" or (text is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
        given = "the text on stdin"
    elif text is None:
        raise ValueError(
            'no text to complete: python -m engine generate "your text" (or --prompt, or a pipe)'
        )
    else:
        given = "--prompt" if a.prompt is not None else "the text to complete"
    if not text.strip():
        raise ValueError(f"{given} is empty: give some text to complete")
    return text


def _model_params(a: argparse.Namespace, s):
    """The sampling with the loaded model's recommendations; says which it took."""
    taken = {k: v for k, v in s.recommended.items() if getattr(a, k) is None}
    if taken:
        said = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in taken.items())
        print(f"sampling: {said} (the model's generation_config.json)", file=sys.stderr)
    return _params(a, s.recommended)


def cmd_generate(a: argparse.Namespace) -> None:
    _params(a)  # a bad option is said before the model loads
    prompt = _prompt(a)
    s = _session(a)
    params = _model_params(a, s)
    if a.chat:
        ids, _ = s.prompt_ids(
            messages=[{"role": "user", "content": prompt}], max_new_tokens=params.max_new_tokens
        )
    else:
        ids, _ = s.prompt_ids(prompt=prompt, max_new_tokens=params.max_new_tokens)
    hint = ENDED_AT_ONCE if not a.chat and s.tok.has_chat_template else ENDED
    _stream(s.generate(ids, params), hint)


CHAT_HELP = """Commands:
  /system TEXT  use TEXT as the system prompt from the next message (/system alone: none)
  /continue     write more of the last answer (one cut at the token limit or by Ctrl-C)
  /reset        start a new conversation (the system prompt stays)
  /help         this list
  /exit         quit (also /quit, /bye, exit, quit or Ctrl-D)
Ctrl-C stops an answer and keeps what it wrote. A message that starts with / : type //."""
QUIT = {"exit", "quit", "/exit", "/quit", "/bye"}


def cmd_chat(a: argparse.Namespace) -> None:
    _params(a)  # a bad option is said before the model loads
    s = _session(a)
    params = _model_params(a, s)
    system, history = a.system or "", []
    print("Type a message; /help lists the commands, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("You: ")
        except EOFError:
            break
        text = line.strip()
        if text in QUIT:
            break
        if text.startswith("/") and not text.startswith("//"):
            command, _, arg = text.partition(" ")
            if command == "/reset":
                history = []
                print("[new conversation]", file=sys.stderr)
            elif command == "/system":
                system = arg.strip()
                print(f"[system prompt: {system!r}]" if system else "[no system prompt]",
                      file=sys.stderr)  # fmt: skip
            elif command == "/help":
                print(CHAT_HELP, file=sys.stderr)
            elif command != "/continue":
                print(f"[unknown command {command}; /help lists them]", file=sys.stderr)
            elif not history or not history[-1]["content"]:
                print("[no answer to continue]", file=sys.stderr)
            else:
                with _said(ValueError):
                    history[-1]["content"] += _answer(s, params, system, history, more=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line[1:] if text.startswith("//") else line})
        with _said(ValueError):  # a message too long for the context: said; the chat goes on
            history.append({"role": "assistant", "content": _answer(s, params, system, history)})
        if history[-1]["role"] == "user":  # not answered: not part of the conversation
            history.pop()


@contextlib.contextmanager
def _said(*errors: type[Exception]):
    """``errors`` raised inside are printed as one line instead of ending the program."""
    try:
        yield
    except errors as e:
        print(f"[error: {e}]", file=sys.stderr)


def _answer(s, params, system: str, history: list[dict], more: bool = False) -> str:
    """Stream an answer to ``history`` (``more``: more of its last message, an answer);
    returns its text."""
    messages = ([{"role": "system", "content": system}] if system else []) + history
    ids, dropped = s.prompt_ids(
        messages=messages, max_new_tokens=params.max_new_tokens, continue_final=more
    )
    if dropped:
        print(f"[dropped {dropped} old messages to fit the context]", file=sys.stderr)
    gen = s.generate(ids, params, dropped)
    sys.stdout.write("Assistant (continued): …" if more else "Assistant: ")
    with _ctrl_c_cancels(gen):  # the answer stops at the next token; the chat goes on
        _stream(gen)
    return gen.text


@contextlib.contextmanager
def _ctrl_c_cancels(gen):
    """While ``gen`` streams, Ctrl-C (SIGINT) asks it to stop instead of ending the program."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, lambda *_: gen.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def cmd_perplexity(a: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    if not a.file.is_file():
        what = "a folder, not a file" if a.file.is_dir() else "no such file"
        raise ValueError(f"{a.file}: {what}")
    try:  # before the model loads: a bad file fails at once
        text = a.file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{a.file}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    s = _session(a)
    ids = s.tok.encode(text)[: a.max_tokens]
    window = min(a.context, s.n_ctx)
    nll, count = 0.0, 0
    for i in range(0, len(ids), window):
        chunk = ids[i : i + window]
        if len(chunk) < 2:
            break
        logits = s.logits(chunk, 0, last_only=False)  # [T, V]
        target = torch.tensor(chunk[1:], device=logits.device)
        nll += float(F.cross_entropy(logits[:-1].double(), target, reduction="sum"))
        count += len(chunk) - 1
        PROGRESS(min(i + window, len(ids)) / len(ids), "scoring")
    PROGRESS.end()
    if count == 0:
        raise ValueError(f"{a.file}: fewer than 2 tokens to score")
    print(f"tokens scored: {count}")
    print(f"perplexity: {math.exp(nll / count):.4f}")


def cmd_serve(a: argparse.Namespace) -> None:
    from .server import serve

    serve()


def cmd_build_demo(a: argparse.Namespace) -> None:
    from .models import build_dense_demo, build_vptq_demo

    print((build_dense_demo if a.dense else build_vptq_demo)(PROGRESS))
    PROGRESS.end()


def cmd_quantize(a: argparse.Namespace) -> None:
    from .quantize import main as quantize_main

    quantize_main(a)


def cmd_build_kernels(a: argparse.Namespace) -> None:
    from .ops import cuda

    ok, why = cuda.load(PROGRESS)
    PROGRESS.end()
    if not ok:
        raise ValueError(f"cannot build the CUDA kernels: {why}")
    print(f"{why}; cached in {cuda.build_dir()}")


def cmd_bench(a: argparse.Namespace) -> None:
    from . import bench

    if a.bench == "e2e":
        from . import bench_e2e

        for name, value, known in (
            ("arch", a.arch, bench_e2e.ARCHS),
            ("scheme", a.scheme, bench.SCHEMES | bench_e2e.GPTQ_SCHEMES),
        ):
            if value not in known:
                raise ValueError(f"unknown --{name} {value!r}; choose from {', '.join(known)}")
        bench_e2e.run_e2e(a.arch, a.scheme, a.context, a.tokens, a.vram_limit, a.breakdown)
        return

    if a.bench == "attention":
        from . import bench_attention

        shapes = [bench_attention.parse_heads(v) for v in a.heads or ()]
        archs = a.arch or ([] if shapes else list(bench_attention.ARCHS))
        for value in archs:
            if value not in bench.MODELS:
                known = ", ".join(bench.MODELS)
                raise ValueError(f"unknown --arch {value!r}; choose from {known}")
        if any(not 0 <= p < 1 << 20 for p in a.position or ()):
            raise ValueError("--position: give cache positions from 0 to 1048575")
        positions = list(a.position or bench_attention.POSITIONS)
        bench_attention.run_attention(archs, positions, shapes)
        return

    if a.bench == "sampling":
        from . import bench_sampling

        if any(not 2 <= v <= 1 << 20 for v in a.vocab or ()):
            raise ValueError("--vocab: give vocabulary sizes from 2 to 1048576")
        bench_sampling.run_sampling([("", v) for v in a.vocab] if a.vocab else None)
        return

    if a.bench == "gptq":
        from . import bench_gptq

        archs = a.arch or ["llama-3.1-8b"]
        for value in archs:
            if value not in bench.ARCHS:
                raise ValueError(f"unknown --arch {value!r}; choose from {', '.join(bench.ARCHS)}")
        if a.group != -1 and a.group < 1:
            raise ValueError(f"--group {a.group}: give a positive group size or -1")
        if any(not 1 <= t <= 65536 for t in a.tokens or ()):
            raise ValueError("--tokens: give token counts from 1 to 65536")
        tokens = tuple(a.tokens or (1, 4, 8, 512))
        bench_gptq.run_gptq(archs, a.bits, a.group, a.act_order, tokens)
        return

    archs = a.arch or list(bench.ARCHS)
    schemes = a.scheme or list(bench.SCHEMES)
    for name, known in (("arch", bench.ARCHS), ("scheme", bench.SCHEMES)):
        for value in archs if name == "arch" else schemes:
            if value not in known:
                raise ValueError(f"unknown --{name} {value!r}; choose from {', '.join(known)}")
    bench.run_kernels(archs, schemes, a.out, tuple(a.tokens or bench.TOKENS))


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    handler = globals()["cmd_" + a.command.replace("-", "_")]
    try:
        handler(a)
    except KeyboardInterrupt:
        PROGRESS.end()
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        PROGRESS.end()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
