"""GPTQ checkpoints (../shared/docs/gptq-format.md): 2, 3, 4 and 8 bits, the v1 ("gptq") and
v2 ("gptq_v2") zero-point conventions, act-order (g_idx), per-module overrides.

One linear layer is ``qweight`` (int32, codes packed along the input dim K), ``qzeros`` (int32,
zero points packed along the output dim N), ``scales`` ([groups, N]), ``g_idx`` ([K], the
group of each input row; trivial when absent) and an optional ``bias``. The dense weight is
``W[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]``, and ``y = x @ W + b``.
Zero points are read into v2 terms (the true z) once, at load time.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .vptq import FormatError

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
FORMATS = {"gptq": "v1", "gptq_v2": "v2"}
# Keys whose disagreement between config.json and quantize_config.json is an error.
DECISIVE = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")
# What GPTQModel before 7.0.0 subtracted from each qzeros word to write v2 zero points as v1
# (gptq-format.md §3.3 case 2, §5.4): one field's "1" a field, except at 3 bits, where the
# constants of words 0 and 2 are swapped (so 3-bit files need exactly these back).
V1_WORD_CONSTANTS = {
    2: (0x55555555,),
    3: (0x24924924, 0x92492492, 0x49249249),
    4: (0x11111111,),
    8: (0x01010101,),
}
FIXED_WRITER = (7, 0, 0)  # GPTQModel converts zero points field by field from this version


@dataclass(frozen=True)
class GPTQSpec:
    in_features: int  # K
    out_features: int  # N
    bits: int
    group_size: int  # rows of K per group; K when the config says -1
    sym: bool
    v2: bool  # zero points stored as they are (gptq_v2), not minus one (gptq)
    bias: bool = False
    # v1 zero points written as whole words minus a constant (GPTQModel before 7.0.0), so a
    # field of z = 0 borrowed from the next one: read back by adding the words' constants
    word_zeros: bool = False

    @property
    def groups(self) -> int:
        return -(-self.in_features // self.group_size)

    def packed_len(self, n: int) -> int:
        """int32 words holding n codes of this width."""
        return n * self.bits // 32

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        K, N = self.in_features, self.out_features
        shapes = {
            "qweight": ((self.packed_len(K), N), "int32"),
            "qzeros": ((self.groups, self.packed_len(N)), "int32"),
            "scales": ((self.groups, N), "float"),
            "g_idx": ((K,), "int64"),
        }
        if self.bias:
            shapes["bias"] = ((N,), "float")
        return shapes


def _unit(bits: int) -> int:
    """Codes packed together: 32 for 3 bits (three words), else the codes of one word."""
    return 32 if bits == 3 else 32 // bits


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes packed along dim 0 (LSB first; 3 bits as one little-endian 96-bit string per three
    words): int32 [R, C] -> int32 [R * 32 / bits, C], values 0 .. 2**bits - 1."""
    mask = (1 << bits) - 1
    w = words.to(torch.int64) & 0xFFFFFFFF  # the words as unsigned: shifts need no care
    if bits != 3:
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, device=w.device).view(1, per, 1)
        return ((w.unsqueeze(1) >> shifts) & mask).reshape(-1, w.shape[1]).to(torch.int32)
    triples = w.reshape(-1, 3, w.shape[1])  # [M, 3, C]: 32 codes each
    bit = torch.arange(32, device=w.device) * 3
    word, off = bit // 32, bit % 32
    low = triples[:, word] >> off.view(1, 32, 1)
    nxt = triples[:, (word + 1).clamp(max=2)] << (32 - off).view(1, 32, 1)
    straddles = (off > 29).view(1, 32, 1)  # codes 10 and 21 cross a word boundary
    codes = torch.where(straddles, low | nxt, low) & mask
    return codes.reshape(-1, w.shape[1]).to(torch.int32)


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes packed along dim 1 (qzeros): int32 [R, C] -> int32 [R, C * 32 / bits]."""
    return unpack_rows(words.T, bits).T.contiguous()


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of unpack_rows (for writing checkpoints): int [R, C] -> int32 words."""
    c = codes.to(torch.int64)
    R, C = c.shape
    unit = _unit(bits)
    if R % unit:
        raise ValueError(f"{R} rows of {bits}-bit codes do not fill whole words")
    blocks = c.reshape(R // unit, unit, C)
    words = torch.zeros(R // unit, unit * bits // 32, C, dtype=torch.int64, device=c.device)
    for i in range(unit):
        pos = i * bits
        word, off = pos // 32, pos % 32
        words[:, word] |= (blocks[:, i] << off) & 0xFFFFFFFF
        if off + bits > 32:
            words[:, word + 1] |= blocks[:, i] >> (32 - off)
    words = words.reshape(-1, C)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_rows(codes.T, bits).T.contiguous()


def permute_rows(
    words: torch.Tensor, order: torch.Tensor, bits: int, step: int | None = None
) -> torch.Tensor:
    """qweight with its code rows taken in ``order`` (row k of the result is row order[k]),
    repacked ``step`` columns at a time (default: 4M codes, about 100 MB of temporaries), on
    the words' device."""
    out = torch.empty_like(words)
    step = step or max(1, 2**22 // (words.shape[0] * 32 // bits))
    for n0 in range(0, words.shape[1], step):
        codes = unpack_rows(words[:, n0 : n0 + step], bits)
        out[:, n0 : n0 + step] = pack_rows(codes[order], bits)
    return out


@dataclass(frozen=True)
class GPTQConfig:
    """The checkpoint's quantization settings, resolved per module by ``spec``."""

    bits: int
    group_size: int
    sym: bool
    v2: bool
    lm_head: bool
    dynamic: dict[str, dict[str, Any]]
    in_block: frozenset[str] | None  # modules_in_block_to_quantize, or None: all of them
    where: str
    word_zeros: bool = False  # see GPTQSpec.word_zeros

    def spec(self, name: str, K: int, N: int, bias: bool) -> GPTQSpec | None:
        """The layer ``name``'s spec, or None where it is left dense."""
        if name == "lm_head" and not self.lm_head:
            return None
        if self.in_block is not None and name != "lm_head":
            part = name.split(".", 3)[-1]  # model.layers.i.<part>
            if part not in self.in_block:
                return None
        fields = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        for pattern, override in self.dynamic.items():
            negative = pattern.startswith("-:")
            regex = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
            if re.match(regex, name):
                if negative:
                    return None
                fields.update({k: override[k] for k in fields if k in override})
        bits, group, sym = fields["bits"], fields["group_size"], fields["sym"]
        where = f"{self.where}: {name}"
        if bits not in BITS:
            raise FormatError(f"{where}: {bits}-bit GPTQ is not supported (2, 3, 4 or 8 bits)")
        if not isinstance(group, int) or not (group == -1 or group > 0):
            raise FormatError(f"{where}: group_size {group!r} must be -1 or a positive number")
        unit = _unit(bits)
        for what, n in (("in_features", K), ("out_features", N)):
            if n % unit:
                raise FormatError(
                    f"{where}: {what} {n} is not a multiple of {unit}, as {bits}-bit packing needs"
                )
        group = K if group == -1 else group
        return GPTQSpec(K, N, bits, group, bool(sym), self.v2, bias, self.word_zeros)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: not a JSON object")
    return obj


def read_config(cfg: dict[str, Any], folder: Path) -> GPTQConfig | None:
    """The GPTQ settings of a model folder (config.json's quantization_config, else
    quantize_config.json), or None when the model is not GPTQ."""
    qc = cfg.get("quantization_config")
    here = folder / "config.json"
    if not (isinstance(qc, dict) and (qc.get("quant_method") or qc.get("method")) == "gptq"):
        qc = None
    side_file = folder / "quantize_config.json"
    side = _read_json(side_file) if side_file.exists() else None
    if side is not None and (side.get("quant_method") or side.get("method", "gptq")) != "gptq":
        side = None
    if qc is None and side is None:
        return None
    if qc is not None and side is not None:
        for key in DECISIVE:
            a, b = _field(qc, key), _field(side, key)
            if a is not None and b is not None and a != b:
                raise FormatError(
                    f"{here} and {side_file} disagree on {key} ({a!r} against {b!r}); "
                    "re-download the model or remove the wrong file"
                )
    src, where = (qc, str(here)) if qc is not None else (side, str(side_file))
    assert src is not None
    fmt = _field(src, "checkpoint_format") or "gptq"
    if src.get("is_marlin_format"):
        fmt = "marlin"
    if fmt not in FORMATS:
        raise FormatError(
            f"{where}: checkpoint_format {fmt!r} is not supported (only 'gptq' and 'gptq_v2'); "
            "use a GPTQ checkpoint in the standard layout"
        )
    pack = src.get("pack_dtype", "int32")
    if pack != "int32":
        raise FormatError(f"{where}: pack_dtype {pack!r} is not supported (only int32)")
    for key in ("bits", "group_size"):
        if not isinstance(src.get(key), int) or isinstance(src.get(key), bool):
            raise FormatError(f"{where}: '{key}' is missing or not a whole number")
    dynamic = src.get("dynamic") or {}
    if not isinstance(dynamic, dict) or not all(isinstance(v, dict) for v in dynamic.values()):
        raise FormatError(f"{where}: 'dynamic' must map module patterns to settings")
    for pattern in dynamic:
        try:
            re.compile(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern)
        except re.error as e:
            raise FormatError(f"{where}: dynamic pattern {pattern!r} is not a regex ({e})") from e
    in_block = src.get("modules_in_block_to_quantize")
    names = None
    if in_block:
        flat = [n for group in in_block for n in (group if isinstance(group, list) else [group])]
        names = frozenset(str(n) for n in flat)
    writer = gptqmodel_version(src)
    word_zeros = FORMATS[fmt] == "v1" and writer is not None and writer < FIXED_WRITER
    if word_zeros:
        log.info(
            "%s: written by GPTQModel %s (before 7.0.0); its v1 zero points are read back "
            "word by word, as it wrote them",
            where,
            ".".join(map(str, writer)),  # type: ignore[arg-type]
        )
    return GPTQConfig(
        bits=src["bits"],
        group_size=src["group_size"],
        sym=bool(src.get("sym", True)),
        v2=FORMATS[fmt] == "v2",
        lm_head=bool(src.get("lm_head", False)),
        dynamic=dynamic,
        in_block=names,
        where=where,
        word_zeros=word_zeros,
    )


def gptqmodel_version(src: dict[str, Any]) -> tuple[int, ...] | None:
    """The GPTQModel version that wrote the file (``meta.quantizer``, a string or a list such as
    ["gptqmodel:4.1.0"]), or None when another tool wrote it or the field says nothing."""
    meta = src.get("meta")
    quantizer = meta.get("quantizer") if isinstance(meta, dict) else None
    quantizer = quantizer if quantizer is not None else src.get("quantizer")
    names = quantizer if isinstance(quantizer, list) else [quantizer]
    for name in names:
        m = re.fullmatch(r"\s*gptqmodel:v?(\d+)\.(\d+)(?:\.(\d+))?\S*\s*", str(name), re.I)
        if m:
            return tuple(int(p or 0) for p in m.groups())
    return None


def _field(d: dict[str, Any], key: str) -> Any:
    if key == "checkpoint_format":
        return d.get("checkpoint_format") or d.get("format")
    return d.get(key)


def zero_points(qzeros: torch.Tensor, spec: GPTQSpec, name: str) -> torch.Tensor:
    """The true zero points, int32 [groups, N]. Symmetric layers use 2**(bits-1) whatever is
    stored (so a v1/v2 mislabel cannot shift them); their stored pattern is only checked."""
    as_v2 = spec.v2
    if spec.word_zeros and not spec.v2:  # the writer's word subtraction undone, borrows too
        qzeros, as_v2 = add_word_constants(qzeros, spec.bits), True
    fields = unpack_cols(qzeros, spec.bits)
    half = 1 << (spec.bits - 1)
    if spec.sym:
        stored = {half - 1: "v1", half: "v2"}
        kinds = {stored.get(int(v)) for v in fields.unique().tolist()}
        if len(kinds) != 1 or kinds.pop() != ("v2" if as_v2 else "v1"):
            log.warning(
                "%s: symmetric, but its stored zero points do not match the %s pattern; "
                "using %d as the zero point",
                name,
                "gptq_v2" if spec.v2 else "gptq",
                half,
            )
        return torch.full_like(fields, half)
    return fields if as_v2 else fields + 1  # v1: stored minus one, the +1 never masked


def add_word_constants(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros words plus V1_WORD_CONSTANTS (word j of a row takes constant j mod 3 at 3 bits),
    modulo 2**32: the v2 words that GPTQModel before 7.0.0 subtracted them from."""
    consts = V1_WORD_CONSTANTS[bits]
    cols = torch.arange(qzeros.shape[1]) % len(consts)
    add = torch.tensor(consts, dtype=torch.int64)[cols].to(qzeros.device)
    w = (qzeros.to(torch.int64) + add) & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def trivial_g_idx(spec: GPTQSpec) -> torch.Tensor:
    return torch.arange(spec.in_features, dtype=torch.int64) // spec.group_size


def check_g_idx(g_idx: torch.Tensor, spec: GPTQSpec, name: str) -> None:
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= spec.groups):
        raise FormatError(
            f"{name}.g_idx: group numbers {int(g_idx.min())}..{int(g_idx.max())} outside "
            f"0..{spec.groups - 1}; the config's group_size does not match the weights"
        )


def dequant(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    spec: GPTQSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W [K, N] in ``dtype``: scales[g_idx] * (q - zeros[g_idx]), rounded once (q - z is a
    small whole number, so the product in ``dtype`` is the float64 one rounded). Columns are
    independent: slices of qweight, zeros and scales give those columns of W."""
    q = unpack_rows(qweight, spec.bits)
    q -= zeros[g_idx]
    return scales.to(dtype)[g_idx] * q.to(dtype)


def describe(spec: GPTQSpec) -> str:
    g = "-1" if spec.group_size == spec.in_features else str(spec.group_size)
    fmt = "gptq_v2" if spec.v2 else "gptq (GPTQModel < 7 zeros)" if spec.word_zeros else "gptq"
    return f"{spec.bits}-bit, group {g}, {'sym' if spec.sym else 'asym'}, {fmt}"
