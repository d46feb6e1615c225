"""VPTQ index bit-packing (vptq-format.md §2.3).

Each row of ``S`` elements is its own little-endian bitstream of ``ceil(S*B/32)`` uint32 words
(stored as int32): element ``g`` occupies bits ``g*B .. g*B+B-1``; bit ``t`` of the stream is bit
``t % 32`` of word ``t // 32``. An element is ``main | (residual << b1)``.
"""

from __future__ import annotations

import torch

_U32 = (1 << 32) - 1


def words_per_row(count: int, bits: int) -> int:
    return (count * bits + 31) // 32


def _positions(count: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(count, device=device, dtype=torch.int64) * bits
    return start >> 5, start & 31  # word, offset within word


def pack_indices(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values: [..., S] non-negative ints < 2**bits -> int32 [..., ceil(S*bits/32)]."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bit width {bits} outside 1..32")
    values = values.to(torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"index out of range for {bits} bits")
    count = values.shape[-1]
    nwords = words_per_row(count, bits)
    word, offset = _positions(count, bits, values.device)
    lead = values.shape[:-1]
    out = torch.zeros(*lead, nwords + 1, dtype=torch.int64, device=values.device)
    low = (values << offset) & _U32
    high = torch.where(offset + bits > 32, values >> (32 - offset), torch.zeros_like(values))
    out.scatter_add_(-1, word.expand(*lead, count), low)
    out.scatter_add_(-1, (word + 1).expand(*lead, count), high)
    out = out[..., :nwords]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_indices(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """words: int32 [..., W32] -> int64 [..., count], each the ``bits``-bit element."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bit width {bits} outside 1..32")
    need = words_per_row(count, bits)
    if words.shape[-1] < need:
        raise ValueError(f"{words.shape[-1]} words per row hold fewer than {count}x{bits} bits")
    w = words.to(torch.int64) & _U32
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # room for the straddling read
    word, offset = _positions(count, bits, words.device)
    low = w.index_select(-1, word) >> offset
    high = w.index_select(-1, word + 1) << (32 - offset)
    high = torch.where(offset + bits > 32, high, torch.zeros_like(high))
    return (low | high) & ((1 << bits) - 1)


def split_main_residual(values: torch.Tensor, main_bits: int, res_bits: int):
    """Split unpacked elements into (main, residual); residual is None when res_bits == 0."""
    main = values & ((1 << main_bits) - 1)
    if res_bits == 0:
        return main, None
    return main, (values >> main_bits) & ((1 << res_bits) - 1)
