"""`bench e2e`'s arithmetic on the CPU (its runs are in test_runtime.py, marker gpu): the decode
roofline counts the part of the KV cache each step reads, not the whole context; and `bench
attention`'s head shapes and bytes."""

import dataclasses

import pytest
import torch

from engine import bench_attention, bench_e2e
from engine.loader import load_model

from .hf_models import make_hf_model


def test_the_roofline_counts_the_cache_a_step_reads_not_the_whole_context(tmp_path):
    make_hf_model("llama3", tmp_path)
    model = load_model(tmp_path, "cpu", torch.float32, max_seq_len=2048).model
    a = model.args
    per_position = 2 * a.n_kv_heads * a.head_dim * 4  # K and V in float32, a layer
    # 5 tokens: the first from the prefill, then steps at 512 .. 515 reading 513 .. 516 keys
    want = a.n_layers * per_position * (513 + 514 + 515 + 516) / 4
    assert bench_e2e.PROMPT == 512
    assert bench_e2e.kv_bytes_read(model, 5) == pytest.approx(want)
    whole = a.n_layers * per_position * 2048
    assert bench_e2e.kv_bytes_read(model, 5) < whole / 3  # what the roofline counted before
    model.args = dataclasses.replace(a, sliding_window=514)  # a step reads at most 514 keys
    want = a.n_layers * per_position * (513 + 514 + 514 + 514) / 4
    assert bench_e2e.kv_bytes_read(model, 5) == pytest.approx(want)


def test_the_decode_at_the_end_of_the_context_counts_the_whole_cache(tmp_path):
    """bench e2e decodes a second time with the cache filled to the end of the context: its
    steps start at context - tokens, and their roofline counts the cache up to each one."""
    make_hf_model("llama3", tmp_path)
    model = load_model(tmp_path, "cpu", torch.float32, max_seq_len=8192).model
    a = model.args
    per_position = 2 * a.n_kv_heads * a.head_dim * 4
    assert bench_e2e.late_start(8192, 64) == 8128
    assert bench_e2e.late_start(4096, 256) == 3840
    assert bench_e2e.late_start(2048, 64) is None  # too close to the decode after the prompt
    # 3 tokens from 8190: steps at 8190 and 8191 read 8191 and 8192 keys
    want = a.n_layers * per_position * (8191 + 8192) / 2
    assert bench_e2e.kv_bytes_read(model, 3, 8190) == pytest.approx(want)


def test_bench_attention_reads_each_models_heads_and_counts_keys_and_values():
    assert bench_attention.heads("llama-3.1-8b") == (32, 8, 128)
    assert bench_attention.heads("llama-3.1-70b") == (64, 8, 128)
    assert bench_attention.heads("qwen2.5-7b") == (28, 4, 128)
    assert bench_attention.heads("mistral-large") == (96, 8, 128)
    # a query at position 1023 reads keys and values 0 .. 1023 of 8 heads of 128 fp16 values
    assert bench_attention.kv_bytes(8, 128, 1023) == 2 * 8 * 1024 * 128 * 2
    assert bench_attention.kv_bytes(4, 128, 0) == 2 * 4 * 128 * 2
    # --heads: query heads / KV heads / head dimension, only what decode attention takes
    assert bench_attention.parse_heads("14/2/64") == (14, 2, 64)
    for bad in ("14/2", "14/3/64", "64/8/96", "32/1/128", "a/b/c"):
        with pytest.raises(ValueError, match="--heads"):
            bench_attention.parse_heads(bad)


def test_the_tensor_core_switch_is_on_unless_turned_off():
    """VPTQ_ATTN_TENSOR_CORES, read when engine.ops.decode is imported: on when unset or 1,
    off with 0 (a fresh Python each, as the engine process reads it)."""
    import os
    import subprocess
    import sys

    code = "from engine.ops import decode; print(decode.TENSOR_CORES_SWITCH)"
    env = {k: v for k, v in os.environ.items() if k != "VPTQ_ATTN_TENSOR_CORES"}
    for value, want in ((None, "True"), ("1", "True"), ("0", "False")):
        extra = {} if value is None else {"VPTQ_ATTN_TENSOR_CORES": value}
        out = subprocess.run([sys.executable, "-c", code], env=env | extra, capture_output=True,
                             text=True, check=True)  # fmt: skip
        assert out.stdout.strip() == want, (value, out.stderr[-2000:])
