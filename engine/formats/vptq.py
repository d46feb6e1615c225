"""VPTQ ``quantization_config``: per-layer specs and the tensors each layer stores.

vptq-format.md §1-2 is the spec. A loader resolves one module's parameters as
``config_for_layers[full_name]``, else ``shared_layer_config[last_component]``, else the module
stays a plain linear. The legacy (vptq <= 0.0.3) top-level ``quant_config`` is read the same way.
Unknown keys are ignored; ``norm_dim != 0`` and ``vector_quant_dim == "in"`` are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .packing import words_per_row


class FormatError(ValueError):
    """A checkpoint or config that cannot be read; the message names the file or field."""


@dataclass(frozen=True)
class VQLayerSpec:
    """Static shape facts of one VPTQ linear layer (K = in_features, N = out_features)."""

    in_features: int
    out_features: int
    vector_len: int  # v: output rows per vector
    num_centroids: int  # k
    num_res_centroids: int = 0  # kr; 0 = no residual
    group_num: int = 1  # G
    group_size: int = 0  # S; 0 = in_features - outlier_size
    outlier_size: int = 0  # P leading stored columns use the outlier codebook
    outlier_vector_len: int = -1
    outlier_centroids: int = -1
    enable_norm: bool = True
    enable_perm: bool = True
    bias: bool = False
    packed: bool = True
    indices_as_float: bool = False

    @property
    def main_bits(self) -> int:
        return int(math.log2(self.num_centroids))

    @property
    def res_bits(self) -> int:
        return int(math.log2(self.num_res_centroids)) if self.num_res_centroids > 0 else 0

    @property
    def index_bits(self) -> int:
        return self.main_bits + self.res_bits

    @property
    def num_indices(self) -> int:  # vector-rows along the output dimension
        return -(-self.out_features // self.vector_len)

    @property
    def has_outliers(self) -> bool:
        return self.outlier_vector_len > 1 and self.outlier_centroids > 0

    @property
    def num_outlier_indices(self) -> int:
        return -(-self.out_features // self.outlier_vector_len)

    @property
    def words(self) -> int:  # packed int32 words per (group, vector-row)
        return words_per_row(self.group_size, self.index_bits)

    @property
    def bits_per_weight(self) -> float:
        """Nominal index bits per weight, as in the community model names."""
        return self.index_bits / self.vector_len

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Checkpoint tensor suffix -> (shape, kind), kind in {"float", "int32", "int16"}."""
        g, v = self.group_num, self.vector_len
        shapes: dict[str, tuple[tuple[int, ...], str]] = {
            "centroids.weight": ((g, self.num_centroids * v), "float"),
        }
        if self.packed:
            shapes["indices"] = ((g, self.num_indices, self.words), "int32")
        else:
            shapes["indices"] = ((g, self.num_indices, self.group_size), "int16")
        if self.num_res_centroids > 0:
            shapes["res_centroids.weight"] = ((g, self.num_res_centroids * v), "float")
        if self.has_outliers:
            n0 = self.outlier_centroids * self.outlier_vector_len
            shapes["outlier_centroids.weight"] = ((1, n0), "float")
            p = self.outlier_size
            shapes["outlier_indices"] = ((1, self.num_outlier_indices, p), "int16")
        if self.enable_perm:
            shapes["perm"] = ((self.in_features,), "int16" if self.packed else "int64")
        if self.enable_norm:
            shapes["weight_scale"] = ((self.in_features,), "float")
            shapes["weight_bias"] = ((self.in_features,), "float")
        if self.bias:
            shapes["bias"] = ((self.out_features,), "float")
        return shapes


def _pair(d: dict[str, Any], key: str, where: str) -> tuple[int, int]:
    value = d.get(key)
    if isinstance(value, int):  # tolerate a bare main value
        return -1, value
    if not (isinstance(value, list | tuple) and len(value) == 2):
        raise FormatError(f"{where}: '{key}' must be a pair [outlier, main], got {value!r}")
    return int(value[0]), int(value[1])


def _power_of_two(n: int, key: str, where: str, low: int = 2) -> None:
    if n < low or n > 65536 or n & (n - 1):
        raise FormatError(f"{where}: '{key}' = {n} is not a power of two in {low}..65536")


def spec_from_dict(d: dict[str, Any], where: str) -> VQLayerSpec:
    """Validate one per-layer dict; ``where`` names it in errors (file and layer)."""
    if d.get("vector_quant_dim", "out") != "out":
        raise FormatError(f"{where}: vector_quant_dim={d['vector_quant_dim']!r} is not supported")
    if d.get("norm_dim", 0) != 0:
        raise FormatError(
            f"{where}: norm_dim={d['norm_dim']} (per-output-row norm) is not supported"
        )
    for key in ("in_features", "out_features", "vector_lens", "num_centroids"):
        if key not in d:
            raise FormatError(f"{where}: missing field '{key}'")
    v0, v = _pair(d, "vector_lens", where)
    k0, k = _pair(d, "num_centroids", where)
    _, kr = _pair(d, "num_res_centroids", where) if "num_res_centroids" in d else (-1, -1)
    kin, nout = int(d["in_features"]), int(d["out_features"])
    if v < 1 or v > 64:
        raise FormatError(f"{where}: vector length {v} outside 1..64")
    _power_of_two(k, "num_centroids", where)
    kr = max(kr, 0)
    if kr:
        _power_of_two(kr, "num_res_centroids", where)
    outliers = v0 > 1 and k0 > 0
    if outliers and "outlier_size" not in d:
        raise FormatError(
            f"{where}: outliers are on (vector_lens[0] = {v0}, num_centroids[0] = {k0}) "
            "but 'outlier_size', their number of columns, is missing: the checkpoint's config "
            "is incomplete; download it again or ask its publisher"
        )
    p = int(d["outlier_size"]) if outliers else 0
    g = int(d.get("group_num", d.get("num_codebooks", 1)))
    s = int(d.get("group_size", (kin - p) // max(g, 1)))
    if g < 1 or p + g * s != kin:
        raise FormatError(
            f"{where}: outlier_size {p} + group_num {g} x group_size {s} != in_features {kin}"
        )
    if outliers:
        _power_of_two(k0, "num_centroids[0] (outliers)", where)
    spec = VQLayerSpec(
        in_features=kin,
        out_features=nout,
        vector_len=v,
        num_centroids=k,
        num_res_centroids=kr,
        group_num=g,
        group_size=s,
        outlier_size=p,
        outlier_vector_len=v0 if outliers else -1,
        outlier_centroids=k0 if outliers else -1,
        enable_norm=bool(d.get("enable_norm", True)),
        enable_perm=bool(d.get("enable_perm", True)),
        bias=bool(d.get("bias", False)),
        packed=bool(d.get("is_indice_packed", True)),
        indices_as_float=bool(d.get("indices_as_float", False)),
    )
    # both codebooks are at most 65536 entries (_power_of_two): at most 32 index bits an entry
    if not spec.packed and kr:
        raise FormatError(f"{where}: unpacked indices with a residual codebook are not supported")
    return spec


def layer_table(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(config_for_layers, shared_layer_config) of a config.json, or None if not VPTQ."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "vptq":
        return qc.get("config_for_layers") or {}, qc.get("shared_layer_config") or {}
    legacy = config.get("quant_config")
    if isinstance(legacy, dict) and legacy:
        return legacy, {}
    return None


def resolve_layer(
    name: str, table: tuple[dict[str, Any], dict[str, Any]], where: str
) -> VQLayerSpec | None:
    """The spec of module ``name``, or None when it stays a plain linear."""
    per_layer, shared = table
    d = per_layer.get(name)
    if d is None:
        d = shared.get(name.rsplit(".", 1)[-1])
    if d is None:
        return None
    return spec_from_dict(d, f"{where}: layer {name}")


def int_kind(dtype: torch.dtype) -> str:
    return {torch.int32: "int32", torch.int16: "int16", torch.int64: "int64"}.get(dtype, "float")
