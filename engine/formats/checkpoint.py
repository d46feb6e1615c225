"""Lazy, memory-mapped reading of single-file and sharded safetensors checkpoints.

Tensors are read one at a time through ``safe_open``, so peak host RAM stays near one tensor
beyond what the model itself keeps. Every failure names the file and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .vptq import FormatError

INDEX_NAME = "model.safetensors.index.json"
REDOWNLOAD = "re-download the model or delete the folder and download it again"


class Checkpoint:
    """Name -> tensor over the safetensors files of one model folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}  # tensor name -> file
        index = self.folder / INDEX_NAME
        if index.exists():
            self._read_index(index)
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise FormatError(
                    f"{self.folder}: no .safetensors files (only safetensors checkpoints are "
                    "supported; convert .bin/.pt files first)"
                )
            for f in files:
                for name in self._open(f).keys():  # noqa: SIM118 (safe_open has no __iter__)
                    self.where[name] = f
        self._handle: tuple[Path, object] | None = None

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index}: not a valid safetensors index ({e}); {REDOWNLOAD}") from e
        for name, file in weight_map.items():
            self.where[name] = self.folder / file
        for f in sorted(set(self.where.values())):
            if not f.exists():
                raise FormatError(f"{f}: shard listed in {INDEX_NAME} is missing; {REDOWNLOAD}")

    @staticmethod
    def _open(f: Path):
        try:
            return safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise FormatError(
                f"{f}: truncated or corrupt safetensors file ({e}); {REDOWNLOAD}"
            ) from e

    def _file(self, f: Path):
        if self._handle is None or self._handle[0] != f:
            self._handle = (f, self._open(f))
        return self._handle[1]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def files(self) -> list[Path]:
        return sorted(set(self.where.values()))

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise FormatError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        f = self.where[name]
        try:
            return self._file(f).get_tensor(name)
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{f}: cannot read tensor '{name}' ({e}); {REDOWNLOAD}") from e

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.where:
            raise FormatError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        return tuple(self._file(self.where[name]).get_slice(name).get_shape())

    @property
    def nbytes(self) -> int:
        """Bytes of the shard files (the tensors plus small headers)."""
        return sum(f.stat().st_size for f in self.files())

    def close(self) -> None:
        self._handle = None
