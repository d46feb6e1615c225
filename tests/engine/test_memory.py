"""engine/memory.py's plans against figures computed by hand for Llama-3.1-8B (fp16):

KV cache a token 2 x 32 layers x 8 KV heads x 128 x 2 bytes = 131072; workspace = the largest
projection dequantized, 4096 x 14336 x 2 = 117440512 (under the 128 MiB cap), + 512 prefill
tokens x (4 x 4096 + 3 x 14336) x 2 = 60817408, + logits 2 x 128256 x 4 = 1026048: 179283968.
"""

import sys

import pytest

from engine.memory import (
    MAX_PREFILL_CHUNK,
    SLICED_SLACK,
    Shape,
    cpu_plan,
    embedding_on_host,
    sliced_budget,
)

from ..configs import LLAMA_31_8B

SHAPE = Shape.from_config(LLAMA_31_8B)
WORKSPACE = 179_283_968
STEP = 2 * 59392 * 2 * 512  # 512 more tokens' activations, twice the workspace's a token


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    for name in ("VPTQ_PREFILL_CHUNK", "VPTQ_EMBED_ON_HOST", "VPTQ_CPU_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)


def test_the_hand_computed_figures():
    assert SHAPE.kv_bytes_per_token == 131072
    assert SHAPE.workspace() == WORKSPACE


def test_prefill_pieces_grow_by_512_tokens_for_each_step_the_room_holds():
    base = WORKSPACE + SLICED_SLACK  # what stays free beside a piece of 512
    assert SHAPE.prefill_chunk(0) == 512
    assert SHAPE.prefill_chunk(base + STEP - 1) == 512
    assert SHAPE.prefill_chunk(base + STEP) == 1024
    assert SHAPE.prefill_chunk(base + 2 * STEP) == 1536
    assert SHAPE.prefill_chunk(base + 100 * STEP) == MAX_PREFILL_CHUNK == 4096


def test_prefill_pieces_can_be_set(monkeypatch):
    monkeypatch.setenv("VPTQ_PREFILL_CHUNK", "96")
    assert SHAPE.prefill_chunk(0) == 96


def test_the_sliced_layouts_get_what_the_cache_workspace_and_slack_leave():
    room = 20 * (1 << 30)
    assert sliced_budget(room, SHAPE, 4096) == room - 131072 * 4096 - WORKSPACE - SLICED_SLACK


def test_the_embedding_table_goes_to_the_host_only_where_the_rest_does_not_fit():
    weights, layouts, context = 3_000_000_000, 3_716_412_288, 4096
    need = weights + 131072 * context + WORKSPACE + layouts + SLICED_SLACK
    assert not embedding_on_host(SHAPE, weights, context, layouts, need)  # exactly fits
    assert embedding_on_host(SHAPE, weights, context, layouts, need - 1)
    # a running engine passes its own overhead in the workspace's place
    assert not embedding_on_host(SHAPE, weights, context, layouts, need - 1, WORKSPACE - 1)
    assert embedding_on_host(SHAPE, weights, context, layouts, need, WORKSPACE + 1)
    # never a table that is the output head too, or not of 16-bit values
    tied = Shape.from_config({**LLAMA_31_8B, "tie_word_embeddings": True})
    assert not embedding_on_host(tied, weights, context, layouts, 0)
    wide = Shape.from_config({**LLAMA_31_8B, "torch_dtype": "float32"})
    assert not embedding_on_host(wide, weights, context, layouts, 0)


def test_the_cpu_plan_takes_bfloat16_only_where_float32_does_not_fit():
    files = 4_000_000_000
    f32, none = cpu_plan(SHAPE, files, True, 4096, None)
    assert none is None and f32.elem == 4  # memory unknown: float32
    assert cpu_plan(SHAPE, files, True, 4096, f32.total) == (f32, None)  # exactly fits
    bf16, over = cpu_plan(SHAPE, files, True, 4096, f32.total - 1)
    assert bf16.elem == 2 and over == f32 and bf16.total < f32.total
    # a dtype asked for is kept, and bfloat16 has nothing smaller to fall back to
    assert cpu_plan(SHAPE, files, True, 4096, 1, flexible=False) == (f32, None)
    assert cpu_plan(SHAPE, files, True, 4096, 1, elem=2)[1] is None


def test_gptq_groups_and_their_unpacked_zero_points():
    """(group, column) pairs of the seven projections, by hand: q, k, v and o read 4096 inputs
    (32 groups of 128) into 4096, 1024, 1024 and 4096 outputs; gate and up 4096 into 14336 each;
    down 14336 (112 groups) into 4096. One group a layer (-1): just the outputs."""
    from engine.memory import gptq_group_columns, gptq_zero_bytes

    outputs = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096
    assert gptq_group_columns(SHAPE, -1) == 32 * outputs
    grouped = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336) + 112 * 4096
    assert gptq_group_columns(SHAPE, 128) == 32 * grouped == 54_525_952
    # an int32 for each in place of 4 packed bits: 28 more bits a zero point
    assert gptq_zero_bytes(SHAPE, 4, 128) == 54_525_952 * 28 // 8


def test_the_cpu_count_of_the_packed_tensors():
    """The files' bytes beyond the embedding table and the output head (one table where they
    are tied) count twice (floats to float32); a GPTQ layer's codes once, plus its unpacked zero
    points, plus its scales grown to the CPU's value size: nothing where that is the file's."""
    from engine.memory import cpu_need, gptq_group_columns, gptq_zero_bytes

    files, table = 4_000_000_000, 128256 * 4096 * 2
    assert cpu_need(SHAPE, files, True, 128).packed == 2 * (files - 2 * table)
    tied = Shape.from_config({**LLAMA_31_8B, "tie_word_embeddings": True})
    assert cpu_need(tied, files, True, 128).packed == 2 * (files - table)
    assert cpu_need(SHAPE, files, False, 128).packed == 0
    zeros = gptq_zero_bytes(SHAPE, 4, 128)
    rest = files - 2 * table
    assert cpu_need(SHAPE, files, True, 128, 2, gptq=(4, 128)).packed == rest + zeros
    grown = rest + zeros + gptq_group_columns(SHAPE, 128) * 2  # fp16 scales as float32
    assert cpu_need(SHAPE, files, True, 128, 4, gptq=(4, 128)).packed == grown


def test_a_config_without_a_context_limit_and_a_wide_attention_layer():
    """No max_position_embeddings: 4096 tokens at most. The largest layer (what prefill expands)
    is q's where hidden x heads x head_dim outgrows hidden x intermediate."""
    bare = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 8,
            "head_dim": 32, "intermediate_size": 128, "vocab_size": 100}  # fmt: skip
    shape = Shape.from_config(bare)
    assert shape.max_context == 4096 and shape.largest_context(1 << 40) == 4096
    assert shape.largest_linear == 64 * 8 * 32  # q: 64 x 256, above the MLP's 64 x 128
    assert Shape.from_config(LLAMA_31_8B).largest_linear == 4096 * 14336  # the MLP's


@pytest.mark.skipif(sys.platform == "win32", reason="Windows asks GlobalMemoryStatusEx")
def test_the_memory_available_is_read_in_bytes_from_proc_meminfo(monkeypatch):
    """Linux: MemAvailable, in kB, as bytes; a file without it or unreadable: None."""
    import io

    from engine import memory

    text = "MemTotal:       16303840 kB\nMemFree:         1234 kB\nMemAvailable:   7654321 kB\n"
    monkeypatch.setattr(memory, "open", lambda path: io.StringIO(text), raising=False)
    assert memory.host_available() == 7654321 * 1024
    monkeypatch.setattr(memory, "open", lambda path: io.StringIO("MemTotal: 1 kB\n"))
    assert memory.host_available() is None

    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(memory, "open", unreadable)
    assert memory.host_available() is None
    monkeypatch.setattr(memory, "open", lambda path: io.StringIO("MemAvailable: lots kB\n"))
    assert memory.host_available() is None
