"""The fit check against figures computed by hand from the published configs.

KV cache per token = 2 (K and V) x layers x KV heads x head dim x 2 bytes (fp16).
Overhead = 512 MiB (CUDA context) + min(largest linear N*K*2 bytes, 16 MiB) (dequant slices)
         + 512 tokens x (4 hidden + 3 intermediate) x 2 bytes (prefill activations)
         + 2 x vocab x 4 bytes (logits).
"""

import pytest

from app.fit import Shape, fit

GiB = 1 << 30

LLAMA_31_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
}  # fmt: skip
LLAMA_31_70B = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
    "num_hidden_layers": 80, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
}  # fmt: skip
QWEN_25_72B = {
    "hidden_size": 8192, "intermediate_size": 29568, "num_attention_heads": 64,
    "num_hidden_layers": 80, "num_key_value_heads": 8, "vocab_size": 152064,
    "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
}  # fmt: skip


@pytest.mark.parametrize(
    ("cfg", "kv_per_token", "overhead"),
    [
        # 2*32*8*128*2; 536870912 + 16777216 + 512*(4*4096+3*14336)*2 + 2*128256*4
        (LLAMA_31_8B, 131_072, 615_491_584),
        # 2*80*8*128*2; 536870912 + 16777216 + 512*(4*8192+3*28672)*2 + 2*128256*4
        (LLAMA_31_70B, 327_680, 676_308_992),
        # 2*80*8*128*2; 536870912 + 16777216 + 512*(4*8192+3*29568)*2 + 2*152064*4
        (QWEN_25_72B, 327_680, 679_251_968),
    ],
)
def test_kv_cache_and_overhead_by_hand(cfg, kv_per_token, overhead):
    shape = Shape.from_config(cfg)
    assert shape.kv_bytes_per_token == kv_per_token
    assert shape.overhead() == overhead


def test_llama_8b_two_bit_fits_an_8_gib_card():
    f = fit(Shape.from_config(LLAMA_31_8B), 4_000_000_000, 8 * GiB, 8192)
    assert f.kv_cache == GiB  # 8192 x 128 KiB
    assert f.needed == 4_000_000_000 + GiB + 615_491_584
    assert f.verdict == "fits"  # 5.69 GB of 8.59 GB
    # (8589934592 - 4e9 - 615491584) // 131072 = 30322 -> 30208 in steps of 256
    assert f.max_context == 30208


def test_llama_70b_two_bit_is_tight_on_22_gib():
    f = fit(Shape.from_config(LLAMA_31_70B), 19_500_000_000, 22 * GiB, 4096)
    assert f.kv_cache == 1_342_177_280
    assert f.verdict == "tight"  # 21.52 GB of 23.62 GB: above 90 %
    # (23622320128 - 19.5e9 - 676308992) // 327680 = 10516 -> 10496
    assert f.max_context == 10496
    assert "Largest context that fits: 10496 tokens" in f.lines()


def test_qwen_72b_does_not_fit_24_gib_and_context_is_capped_by_the_config():
    shape = Shape.from_config(QWEN_25_72B)
    f = fit(shape, 30_000_000_000, 24 * GiB, 4096)
    assert f.verdict == "does not fit" and f.max_context == 0
    assert "The weights alone do not fit" in f.lines()
    roomy = fit(shape, 21_000_000_000, 80 * GiB, 32768)
    assert roomy.verdict == "fits" and roomy.max_context == 32768  # 194557 by memory


def test_parameter_count_of_llama_8b():
    # 32 x (4096*(4096+2*1024) + 4096*4096 + 3*4096*14336 + 2*4096) + 4096 + 2*128256*4096
    assert Shape.from_config(LLAMA_31_8B).parameters() == 8_030_261_248


def test_missing_field_is_named():
    with pytest.raises(ValueError, match=r"config\.json has no 'num_hidden_layers'"):
        Shape.from_config({"hidden_size": 1, "num_attention_heads": 1})
