"""`python -m engine generate|perplexity` as a user runs them, including bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .test_loader import CONFIG, build_vptq_model

DATA = Path(__file__).parent.parent / "data"


def run(*args, timeout=300, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "engine", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,  # a pipe, never the terminal pytest runs in
    )


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.e2e
@pytest.mark.parametrize("weights", ["float32", "float16"])  # float16: the engine's default
def test_generate_chat_answers_paris(demo_path, weights, monkeypatch):
    monkeypatch.setenv("VPTQ_CPU_WEIGHTS", weights)
    r = run(
        "generate",
        "--model",
        "demo",
        "What is the capital of France?",  # the text as the argument
        "--chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "30",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "TTFT" in r.stderr and "tok/s" in r.stderr  # statistics on stderr only
    assert "kernels: reference" in r.stderr
    # how the answer ended, in the chat window's words (it ends itself or at the 30 tokens)
    assert "\n[done] " in r.stderr or "\n[cut at the token limit] 30 tokens" in r.stderr


@pytest.mark.e2e
def test_generate_starts_from_the_models_recommended_sampling(demo_path, tmp_path):
    """What the model's generation_config.json recommends is used where no option is given
    (and said on stderr); an option given wins."""
    m = tmp_path / "m"
    m.mkdir()
    for f in demo_path.iterdir():
        if f.name != "generation_config.json":
            (m / f.name).symlink_to(f)
    (m / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": 2, "do_sample": True, "temperature": 0, "repetition_penalty": 1.3}
        )
    )
    prompt = ["Write a long story about a lighthouse keeper.", "--chat", "--max-new-tokens", "40"]
    recommended = run("generate", "--model", m, *prompt)
    assert recommended.returncode == 0, recommended.stderr
    said = "sampling: temperature 0, repetition penalty 1.3 (the model's generation_config.json)"
    assert said in recommended.stderr
    given = run("generate", "--model", m, *prompt, "--temperature", "0",
                "--repetition-penalty", "1.3")  # fmt: skip
    assert given.stdout == recommended.stdout  # greedy with the same penalty
    assert "sampling:" not in given.stderr  # nothing taken from the model
    unpenalized = run("generate", "--model", m, *prompt, "--repetition-penalty", "1")
    assert "sampling: temperature 0 (the model's" in unpenalized.stderr
    assert unpenalized.stdout != recommended.stdout


@pytest.mark.e2e
def test_perplexity_prints_it_last(demo_path):
    r = run(
        "perplexity",
        "--model",
        demo_path,
        "--file",
        DATA / "pride_and_prejudice_ch1.txt",
        "--max-tokens",
        "600",
        "--context",
        "256",
    )
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"perplexity: (\d+\.\d+)", last)
    assert m, r.stdout
    assert 2.0 < float(m.group(1)) < 60.0  # a real English model on English prose
    assert "tokens scored: 597" in r.stdout  # 3 windows (256, 256, 88), each loses one token


def test_bad_input_gives_one_line_errors(tmp_path):
    build_vptq_model(tmp_path / "m", shard_bytes=200_000)
    m = tmp_path / "m"
    shards = sorted(m.glob("model-*.safetensors"))
    cases = []
    # truncated shard
    t = tmp_path / "trunc"
    t.mkdir()
    for f in m.iterdir():
        (t / f.name).write_bytes(f.read_bytes())
    (t / shards[0].name).write_bytes(shards[0].read_bytes()[:5000])
    cases.append((t, [shards[0].name, "truncated or corrupt", "re-download"]))
    # missing shard
    miss = tmp_path / "missing"
    miss.mkdir()
    for f in m.iterdir():
        if f.name != shards[1].name:
            (miss / f.name).write_bytes(f.read_bytes())
    cases.append((miss, [shards[1].name, "is missing"]))
    # config without a needed field; unknown architecture
    for name, edit, needle in [
        ("nofield", lambda c: c.pop("num_hidden_layers"), "missing field 'num_hidden_layers'"),
        (
            "arch",
            lambda c: c.update(architectures=["FalconForCausalLM"]),
            "unsupported architecture FalconForCausalLM",
        ),
    ]:
        d = tmp_path / name
        d.mkdir()
        cfg = dict(CONFIG)
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        cases.append((d, [str(d / "config.json"), needle]))
    for folder, needles in cases:
        r = run("generate", "--model", folder, "--prompt", "hi", "--max-new-tokens", "2")
        assert_one_line_error(r, *needles)
    assert_one_line_error(run("generate", "--model", m, "--prompt", "  "), "--prompt is empty")
    assert_one_line_error(run("generate", "--model", m, "  "), "the text to complete is empty")
    assert_one_line_error(run("generate", "--model", m), "the text on stdin is empty")
    assert_one_line_error(run("generate", "--model", m, "a", "--prompt", "b"), "given twice")
    for bad in ("0", "-5", "lots"):  # refused by the parser, before any model is read
        r = run("generate", "--model", m, "--prompt", "x", "--context", bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.splitlines()[-1] == (
            "python -m engine generate: error: argument --context: "
            f"'{bad}' is not a whole number of tokens, at least 1"
        )
    assert_one_line_error(
        run("generate", "--model", tmp_path / "absent", "--prompt", "x"), "not found"
    )
    # a text perplexity cannot read is named before the model loads
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))  # was a bare UnicodeDecodeError
    for file, needle in [
        (latin, "latin1.txt: not UTF-8 text (byte 3)"),
        (tmp_path, "a folder, not a file"),
        (tmp_path / "absent.txt", "absent.txt: no such file"),
    ]:
        assert_one_line_error(run("perplexity", "--model", m, "--file", file), needle)
    if not torch.cuda.is_available():  # was torch's AssertionError on a CPU build
        r = run("generate", "--model", m, "--prompt", "x", "--device", "cuda")
        assert_one_line_error(r, "device 'cuda': PyTorch sees no CUDA GPU")
        r = run("generate", "--model", m, "--prompt", "x", "--device", "cuda:1")
        assert_one_line_error(r, "device 'cuda:1': PyTorch sees no CUDA GPU")
    # a GPU's number is taken (cuda:N); anything else is named
    r = run("generate", "--model", m, "--prompt", "x", "--device", "gpu1")
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        "python -m engine generate: error: argument --device: "
        "'gpu1' is not one of auto, cpu, cuda, cuda:N"
    )


@pytest.mark.e2e
def test_generate_takes_the_text_from_an_option_or_a_pipe(demo_path):
    greedy = ("--model", "demo", "--temperature", "0", "--max-new-tokens", "6")
    text = "The three primary colours are"
    runs = {
        "option": run("generate", *greedy, "--prompt", text),
        "pipe": run("generate", *greedy, stdin=text),
        "dash": run("generate", *greedy, "-", stdin=text),
    }
    for how, r in runs.items():
        assert r.returncode == 0, (how, r.stderr)
        assert "6 tokens" in r.stderr, (how, r.stderr)
    answers = {how: r.stdout for how, r in runs.items()}
    assert answers["option"].strip() and len(set(answers.values())) == 1, answers
    assert all("ended the text at once" not in r.stderr for r in runs.values())


class FakeGeneration:
    """What _stream reads of a Generation: its pieces of text, then how it ended."""

    def __init__(self, pieces, reason):
        from engine.generate import Stats

        self.pieces, self.reason = pieces, reason
        self.stats = Stats(prompt_tokens=7, completion_tokens=max(1, len(pieces)))

    def __iter__(self):
        return iter(self.pieces)


@pytest.mark.parametrize(
    "pieces, reason, noted",
    [
        ([], "stop", True),  # an end-of-text token first: nothing written
        (["", ""], "stop", True),  # pieces that held no text yet (a multi-byte character)
        (["Paris"], "stop", False),
        ([], "length", False),  # --max-new-tokens 0 is refused; a stop string ends as "stop"
        ([], "cancelled", False),
    ],
)
def test_generate_says_why_a_bare_question_printed_nothing(pieces, reason, noted, capsys):
    """An instruct model given a bare question ends the text at once (the demo does with "What
    is the capital of France?"), and `generate` printed nothing but its statistics: it now says
    that such a model answers with --chat. Any other model ending at once is said to have."""
    from engine.__main__ import ENDED_AT_ONCE, _stream

    _stream(FakeGeneration(pieces, reason), ENDED_AT_ONCE)
    out, err = capsys.readouterr()
    assert out == "".join(pieces)
    assert (f"note: {ENDED_AT_ONCE}" in err) == noted, err
    assert "add --chat" in ENDED_AT_ONCE
    # with --chat, or for a model without a chat template: said without the hint
    _stream(FakeGeneration(pieces, reason))
    err = capsys.readouterr().err
    plain = "note: the model ended the text at once (its first token was its end of text)\n"
    assert (plain in err) == noted and "--chat" not in err, err


@pytest.mark.e2e
def test_a_bare_question_to_the_demo_is_noted_where_it_prints_nothing(demo_path):
    """The same through the command line: the demo (an instruct model with a chat template)
    given the README's question without --chat ends it at once here; whatever it does, the
    note stands exactly where nothing was printed."""
    r = run("generate", "--model", "demo", "--temperature", "0", "--max-new-tokens", "12",
            "What is the capital of France?")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (r.stdout.strip() == "") == ("note: the model ended the text at once" in r.stderr), (
        r.stdout,
        r.stderr,
    )


@pytest.mark.e2e
def test_terminal_chat_keeps_the_conversation(demo_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "chat",
            "--model",
            "demo",
            "--temperature",
            "0",
            "--repetition-penalty",  # not the demo's 1.05: greedy, no Berlin
            "1",
            "--max-new-tokens",
            "30",
            "--system",
            "You are a helpful assistant.",
        ],
        input="What is the capital of France?\nAnd of Germany?\nexit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.split("Assistant: ")[1:3]
    assert "Paris" in first and "Berlin" in second
    # the second turn reads only its new tokens; the first turn and its answer are reused
    firsts, seconds = re.findall(r"prefill (\d+) tokens( \((\d+) reused\))? at", r.stderr)
    assert firsts[1] == "" and int(firsts[0]) > 10  # the system prompt and the question
    assert int(seconds[2]) > int(firsts[0]) and 0 < int(seconds[0]) < int(firsts[0])


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("e2e", "--scheme", "gptq-5bit"), ("unknown --scheme 'gptq-5bit'", "v8-k65536-0",
                                            "gptq-4bit-act", "gptq-8bit")),
        (("kernels", "--scheme", "gptq-4bit"), ("unknown --scheme 'gptq-4bit'",)),  # VPTQ only
        (("gptq", "--tokens", "0"), ("--tokens: give token counts from 1 to 65536",)),
        (("gptq", "--group", "0"), ("--group 0: give a positive group size or -1",)),
        (("gptq", "--arch", "qwen2.5-7b"), ("unknown --arch 'qwen2.5-7b'", "llama-3.1-70b")),
        (("attention", "--arch", "gpt-2"), ("unknown --arch 'gpt-2'", "mistral-large")),
        (("attention", "--position", "-1"), ("--position: give cache positions from 0",)),
        (("sampling", "--vocab", "1"), ("--vocab: give vocabulary sizes from 2 to 1048576",)),
    ],
)  # fmt: skip
def test_bench_settings_are_checked_before_any_gpu_work(args, needles):
    assert_one_line_error(run("bench", *args, timeout=120), *needles)


@pytest.mark.e2e
def test_a_prompt_longer_than_the_context_says_what_to_change(demo_path):
    """A raw prompt that leaves no room: the numbers (prompt, what is left of the context, what
    is kept for the answer) and the options that make room."""
    r = run(
        "generate", "--model", "demo", "--context", "64", "--max-new-tokens", "5",
        "--prompt", "word " * 200,
    )  # fmt: skip
    n = int(re.search(r"the prompt has (\d+) tokens", r.stderr).group(1))
    assert n > 64
    assert_one_line_error(
        r, f"the prompt has {n} tokens, but 59 of the 64-token context are left for it (5 are "
        "kept for the answer)", "--max-new-tokens", "--context",
    )  # fmt: skip


def test_terminal_chat_commands_and_ctrl_c_stop_an_answer(demo_path):
    import os
    import signal
    import threading
    import time

    p = subprocess.Popen(
        [sys.executable, "-m", "engine", "chat", "--model", "demo", "--temperature", "0",
         "--max-new-tokens", "300"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(p.stderr), daemon=True)
    reader.start()
    watchdog = threading.Timer(300, p.kill)  # a hung chat fails the test, not the suite
    watchdog.start()
    try:
        p.stdin.write("/help\n/system Answer in French.\n/nope\n")
        p.stdin.write("Write a very long story about a cat, with many chapters.\n")
        p.stdin.flush()
        out = ""
        deadline = time.time() + 240
        while out.count(" ") < 20 and time.time() < deadline:  # some of the answer is out
            out += p.stdout.read(1)
        p.send_signal(signal.SIGINT)  # stops the answer, not the chat
        # a new conversation without the system prompt: the answer does not hang on where
        # the signal cut the story
        p.stdin.write("/reset\n/system\nWhat is the capital of France?\nexit\n")
        p.stdin.flush()
        p.stdin.close()
        rest = p.stdout.read()  # to the end (communicate() would race the reader for stderr)
        p.wait(timeout=240)
    finally:
        watchdog.cancel()
        p.kill()
    reader.join(30)
    log = "".join(err)
    assert p.returncode == 0, log
    assert "/system TEXT" in log and "[system prompt: 'Answer in French.']" in log
    assert "[unknown command /nope; /help lists them]" in log
    assert "[new conversation]" in log and "Traceback" not in log
    endings = re.findall(r"^\[(done|stopped|cut at the token limit)\] (\d+) tokens", log, re.M)
    assert endings[0][0] == "stopped" and int(endings[0][1]) < 300  # Ctrl-C ended it
    assert "[no system prompt]" in log
    assert endings[1][0] == "done" and "Paris" in rest.split("Assistant: ")[-1]


def test_every_option_of_every_command_is_explained_with_its_default():
    import argparse

    from engine.__main__ import parser

    def commands(p, name):
        yield name, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, sp in action.choices.items():
                    yield from commands(sp, f"{name} {sub}")

    found = dict(commands(parser(), "engine"))
    assert {"engine quantize", "engine bench e2e", "engine chat"} <= set(found)
    for name, p in found.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
    # the sampling options' help says the engine's own defaults
    from engine.__main__ import SAMPLING_DEFAULTS
    from engine.sampling import SamplingParams

    assert {k: getattr(SamplingParams(), k) for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    r = run("quantize", "--help")
    assert "codebook entries, a power of two" in r.stdout and "(default: 256)" in r.stdout
    assert "default: None" not in r.stdout
    assert "(default: 4096)" in run("bench", "e2e", "--help").stdout
    # a missing command names the choices
    assert run("bench").stderr.endswith("required: {kernels,gptq,attention,sampling,e2e}\n")
    assert run().stderr.endswith("required: {generate,chat,perplexity,serve,quantize,"
                                 "build-demo,build-kernels,bench}\n")  # fmt: skip


def test_terminal_chat_continue_and_a_message_too_long_for_the_context(demo_path):
    q = "Tell me about the planet Mars in three sentences."
    whole = run("generate", "--model", "demo", "--prompt", q, "--chat", "--temperature", "0",
                "--max-new-tokens", "24")  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    r = subprocess.run(
        [sys.executable, "-m", "engine", "chat", "--model", "demo", "--temperature", "0",
         "--max-new-tokens", "12", "--context", "1024"],
        input=f"/continue\n{'word ' * 3000}\n{q}\n/continue\nexit\n",
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "[no answer to continue]" in r.stderr
    assert "[error: the last message needs 30" in r.stderr  # said; the chat went on
    first, more = r.stdout.split("Assistant: ")[1].split("Assistant (continued): …")
    first = first.removesuffix("\n").removesuffix("You: ")
    # the answer cut at 12 tokens and continued for 12 is the 24-token answer
    assert first.strip() and (first + more).strip().startswith(whole.stdout.strip())


def test_progress_on_a_terminal_puts_each_stage_on_its_own_line(monkeypatch):
    import io

    from engine.__main__ import ProgressLine

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    line = ProgressLine()
    line(0.0, "quantizing the demo model")
    line(0.5, "quantizing the demo model")  # the same stage: redrawn in place
    line(0.25, "loading")  # a shorter stage: not drawn over the longer one's tail
    line.end()
    shown = [row.split("\r")[-1] for row in err.getvalue().split("\n")]
    assert shown == ["quantizing the demo model:  50%", "loading:  25%", ""]
