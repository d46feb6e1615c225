"""Will it fit: weights (exact file sizes) + KV cache at a context + runtime overhead, against
the free VRAM of one GPU. The byte arithmetic is the engine's own (engine/memory.py)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.memory import Shape, gib

__all__ = ["Fit", "Shape", "fit", "gib"]
TIGHT = 0.90  # above this share of free VRAM the verdict is "tight"


@dataclass(frozen=True)
class Fit:
    weights: int
    kv_cache: int
    overhead: int
    free: int
    context: int
    max_context: int  # the largest context that fits (0: not even the weights)

    @property
    def needed(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    @property
    def verdict(self) -> str:
        if self.needed <= TIGHT * self.free:
            return "fits"
        return "tight" if self.needed <= self.free else "does not fit"

    def lines(self) -> list[str]:
        out = [
            f"Weights {gib(self.weights)}",
            f"KV cache at {self.context} tokens {gib(self.kv_cache)}",
            f"Runtime overhead {gib(self.overhead)}",
            f"Needed {gib(self.needed)} of {gib(self.free)} free",
        ]
        if self.max_context:
            out.append(f"Largest context that fits: {self.max_context} tokens")
        else:
            out.append("The weights alone do not fit")
        return out


def fit(shape: Shape, weight_bytes: int, free: int, context: int) -> Fit:
    overhead = shape.overhead()
    largest = shape.largest_context(free - weight_bytes - overhead)
    return Fit(weight_bytes, shape.kv_bytes_per_token * context, overhead, free, context, largest)
