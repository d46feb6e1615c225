"""Tiny random Hugging Face models written to disk: the independent oracle for our decoder."""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_hf_model(kind: str, folder: Path, **overrides):
    """Save a random transformers model of ``kind`` (llama|llama3|mistral|qwen2) and return it."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama3":
        cfg = tf.LlamaConfig(
            **BASE,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
        model_cls = tf.LlamaForCausalLM
    elif kind == "llama":
        cfg, model_cls = tf.LlamaConfig(**BASE), tf.LlamaForCausalLM
    elif kind == "mistral":
        cfg, model_cls = tf.MistralConfig(**BASE, sliding_window=None), tf.MistralForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**BASE, tie_word_embeddings=True)
        model_cls = tf.Qwen2ForCausalLM
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model
