"""Static, preallocated KV cache: one [B, H_kv, max_seq, D] pair per layer, all of them views
into one allocation (KVCache.allocate)."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, H_kv, max_seq, D], contiguous (the fused decode kernels read them so)."""
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    @classmethod
    def allocate(
        cls,
        layers: int,
        batch: int,
        n_kv_heads: int,
        max_seq: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> list[KVCache]:
        """The caches of ``layers`` layers as views into one zeroed tensor. Allocated one by one,
        the PyTorch allocator would serve each 1-10 MiB tensor from its own 20 MiB segments
        (two 8 MiB tensors of a Llama-3.1-70B layer at 4096 tokens take 20 MiB): 25% more than
        the cache, which is what the engine's memory plan (engine/memory.py) does not count."""
        store = torch.zeros(
            (layers, 2, batch, n_kv_heads, max_seq, head_dim), dtype=dtype, device=device
        )
        return [cls(store[i, 0], store[i, 1]) for i in range(layers)]

    @property
    def max_seq(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v: [B, H_kv, T, D] at positions start..start+T-1; return the filled prefix."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write one position given as a device tensor (pos: [1]); return the whole cache. The
        caller masks what lies beyond pos: this is the CUDA-graph form of update()."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v
