"""engine/config.py ModelArgs.from_hf_config field by field: what a config.json leaves out gets
the value transformers would use, by hand."""

from __future__ import annotations

import pytest

from engine.config import ModelArgs
from engine.formats.vptq import FormatError

BARE = {  # what a model cannot do without
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 1000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
}


def test_a_bare_config_takes_the_defaults():
    a = ModelArgs.from_hf_config(BARE)
    assert (a.arch, a.vocab_size, a.hidden_size, a.intermediate_size, a.n_layers) == (
        "LlamaForCausalLM", 1000, 256, 512, 2
    )  # fmt: skip
    assert (a.n_heads, a.n_kv_heads, a.head_dim) == (8, 8, 32)  # MHA; hidden / heads
    assert (a.rms_norm_eps, a.rope_theta, a.rope_scaling) == (1e-6, 10000.0, None)
    assert (a.max_position_embeddings, a.tie_word_embeddings) == (4096, False)
    assert (a.qkv_bias, a.o_bias, a.mlp_bias, a.sliding_window) == (False, False, False, None)
    assert (a.torch_dtype, a.eos_token_ids, a.bos_token_id) == ("float16", [], None)


def test_given_fields_win_over_the_defaults():
    a = ModelArgs.from_hf_config({
        **BARE, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 500000, "max_position_embeddings": 131072, "tie_word_embeddings": True,
        "attention_bias": True, "mlp_bias": True, "torch_dtype": "bfloat16",
        "eos_token_id": [7, 9], "bos_token_id": 1,
    })  # fmt: skip
    assert (a.n_kv_heads, a.head_dim, a.rms_norm_eps, a.rope_theta) == (2, 64, 1e-5, 500000.0)
    assert (a.max_position_embeddings, a.tie_word_embeddings) == (131072, True)
    assert (a.qkv_bias, a.o_bias, a.mlp_bias) == (True, True, True)
    assert (a.torch_dtype, a.eos_token_ids, a.bos_token_id) == ("bfloat16", [7, 9], 1)
    one = ModelArgs.from_hf_config({**BARE, "eos_token_id": 5, "num_key_value_heads": None})
    assert one.eos_token_ids == [5] and one.n_kv_heads == 8  # null: as if left out
    assert ModelArgs.from_hf_config({**BARE, "dtype": "float32"}).torch_dtype == "float32"


def test_the_architecture_from_model_type_and_qwens_window():
    """No 'architectures': the model_type names it. Qwen2 has q, k, v biases always and a
    sliding window only with use_sliding_window; Mistral's window is used as given."""
    bare = {k: v for k, v in BARE.items() if k != "architectures"}
    for model_type, arch in [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                             ("mistral", "MistralForCausalLM")]:  # fmt: skip
        assert ModelArgs.from_hf_config({**bare, "model_type": model_type}).arch == arch
    qwen = {**bare, "model_type": "qwen2", "sliding_window": 4096}
    a = ModelArgs.from_hf_config(qwen)
    assert (a.qkv_bias, a.o_bias, a.sliding_window) == (True, False, None)
    assert ModelArgs.from_hf_config({**qwen, "use_sliding_window": True}).sliding_window == 4096
    mistral = {**bare, "model_type": "mistral", "sliding_window": 4096}
    assert ModelArgs.from_hf_config(mistral).sliding_window == 4096
    assert ModelArgs.from_hf_config({**mistral, "sliding_window": None}).sliding_window is None


def test_rope_settings_from_either_transformers_layout():
    """rope_scaling (transformers 4) or rope_parameters (5, which also holds rope_theta); a
    'default' type is no scaling."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    a = ModelArgs.from_hf_config({**BARE, "rope_scaling": llama3, "rope_theta": 500000.0})
    assert (a.rope_scaling, a.rope_theta) == (llama3, 500000.0)
    b = ModelArgs.from_hf_config({**BARE, "rope_parameters": {**llama3, "rope_theta": 5e5}})
    assert b.rope_scaling["factor"] == 8.0 and b.rope_theta == 500000.0
    plain = {"rope_type": "default", "rope_theta": 1e6}
    c = ModelArgs.from_hf_config({**BARE, "rope_parameters": plain})
    assert (c.rope_scaling, c.rope_theta) == (None, 1000000.0)
    d = ModelArgs.from_hf_config({**BARE, "rope_scaling": {"type": "default"}})
    assert d.rope_scaling is None
    linear = {"type": "linear", "factor": 2.0}  # the older key
    assert ModelArgs.from_hf_config({**BARE, "rope_scaling": linear}).rope_scaling == linear


@pytest.mark.parametrize(
    "change,message",
    [
        ({"hidden_size": None}, "cfg.json: missing field 'hidden_size'"),
        ({"architectures": []}, "cfg.json: unsupported architecture none given"),
        ({"architectures": None, "model_type": "gpt2"}, "unsupported architecture gpt2 "),
        ({"architectures": ["BertModel"]}, "unsupported architecture BertModel (supported: "
                                           "LlamaForCausalLM, MistralForCausalLM, "
                                           "Qwen2ForCausalLM)"),
    ],
)  # fmt: skip
def test_what_a_config_cannot_lack_is_named(change, message):
    with pytest.raises(FormatError) as e:
        ModelArgs.from_hf_config({**BARE, **change}, "cfg.json")
    assert message in str(e.value)
