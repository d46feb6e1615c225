"""Write checkpoints in the VPTQ-community layout: packed indices, config_for_layers, shards.

Used by the quantizer and by the tests, which build random layers and read them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_NAME
from .packing import pack_indices
from .vptq import VQLayerSpec


def spec_to_dict(spec: VQLayerSpec) -> dict[str, Any]:
    """The per-layer dict as upstream's writer saves it (keys sorted)."""
    out = -1 if not spec.has_outliers else spec.outlier_vector_len
    return {
        "bias": spec.bias,
        "enable_norm": spec.enable_norm,
        "enable_perm": spec.enable_perm,
        "group_num": spec.group_num,
        "group_size": spec.group_size,
        "in_features": spec.in_features,
        "indices_as_float": spec.indices_as_float,
        "is_indice_packed": spec.packed,
        "num_centroids": [spec.outlier_centroids if spec.has_outliers else -1, spec.num_centroids],
        "num_res_centroids": [-1, spec.num_res_centroids or -1],
        "out_features": spec.out_features,
        "outlier_size": spec.outlier_size,
        "vector_lens": [out, spec.vector_len],
    }


def layer_tensors(
    spec: VQLayerSpec,
    main: torch.Tensor,
    residual: torch.Tensor | None,
    codebooks: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one layer from unpacked indices ([G, R, S] each) and the float
    tensors (centroids.weight, res_centroids.weight, weight_scale, ..., perm as int64 [K])."""
    out = dict(codebooks)
    if spec.packed:
        values = main.to(torch.int64)
        if residual is not None:
            values = values | (residual.to(torch.int64) << spec.main_bits)
        out["indices"] = pack_indices(values, spec.index_bits)
    else:
        out["indices"] = _as_int16(main)
    if "perm" in out:
        out["perm"] = _as_int16(out["perm"]) if spec.packed else out["perm"].to(torch.int64)
    if "outlier_indices" in out:
        out["outlier_indices"] = _as_int16(out["outlier_indices"])
    return out


def _as_int16(t: torch.Tensor) -> torch.Tensor:
    """uint16 values stored bit-cast as int16, as upstream does."""
    t = t.to(torch.int64)
    return torch.where(t >= 1 << 15, t - (1 << 16), t).to(torch.int16)


def write_checkpoint(
    folder: Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    shard_bytes: int | None = None,
) -> None:
    """config.json plus one model.safetensors, or shards with the index when ``shard_bytes``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shard_bytes is None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
