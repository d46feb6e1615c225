"""Will it fit: weights (exact file sizes) + KV cache at a context + runtime overhead, against
the free VRAM of one GPU, and whether the optional fast decode layout (engine/ops/sliced.py)
fits beside them; without a GPU, what the CPU path takes against the available memory. The
byte arithmetic is the engine's own (engine/memory.py), which refuses a load that would not
fit with the same numbers."""

from __future__ import annotations

from dataclasses import dataclass

from engine.memory import (
    SLICED_SLACK,
    CpuNeed,
    Shape,
    cpu_largest_context,
    cpu_plan,
    embedding_on_host,
    gib,
)

__all__ = ["CpuFit", "Fit", "Shape", "cpu_fit", "fit", "gib", "largest_line"]
TIGHT = 0.90  # above this share of free VRAM the verdict is "tight"


def largest_line(tokens: int) -> str:
    """The breakdown's line for the largest context that fits (the Models window links it)."""
    return f"Largest context that fits: {tokens} tokens"


def verdict(needed: int, free: int) -> str:
    if needed <= TIGHT * free:
        return "fits"
    return "tight" if needed <= free else "does not fit"


@dataclass(frozen=True)
class Fit:
    weights: int
    kv_cache: int
    overhead: int
    free: int
    context: int
    max_context: int  # the largest context that fits (0: not even the weights)
    fast_layout: int = 0  # the fast decode layout of a VPTQ model with large codebooks (bytes)
    host: int = 0  # the embedding table, kept in host memory (weights counts only the GPU part)
    unpacked: int = 0  # of weights: GPTQ zero points a load unpacks beyond the files
    reclaimed: int = 0  # of free: what the model loaded now holds (the engine lets it go first)
    free_known: bool = True  # False: free is the GPU's total (NVML cannot be read, app/gpu.py)

    @property
    def needed(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    @property
    def verdict(self) -> str:
        return verdict(self.needed, self.free)

    def lines(self) -> list[str]:
        out = [
            f"Weights {gib(self.weights)}"
            + (
                f" (the embedding table, {gib(self.host)}, stays in host memory)"
                if self.host
                else ""
            )
            + (
                f" (with {gib(self.unpacked)} of zero points unpacked at load)"
                if self.unpacked
                else ""
            ),
            f"KV cache at {self.context} tokens {gib(self.kv_cache)}",
            f"Runtime overhead {gib(self.overhead)}",
            f"Needed {gib(self.needed)} of {gib(self.free)} "
            + ("free" if self.free_known else "(the GPU's total)")
            + (
                f" (with the {gib(self.reclaimed)} of the model loaded now, which is unloaded "
                "first)"
                if self.reclaimed
                else ""
            ),
        ]
        if self.max_context:
            out.append(largest_line(self.max_context))
        else:
            out.append("The weights alone do not fit")
        if self.fast_layout and self.layout_fits:
            out.append(f"Fast decode layout {gib(self.fast_layout)}: fits too")
        elif self.fast_layout:
            out.append(
                f"Fast decode layout {gib(self.fast_layout)}: no room at this context "
                "(decoding is slower)"
            )
        return out

    @property
    def layout_fits(self) -> bool:
        """Whether the engine will build the whole fast decode layout (it builds what fits)."""
        return self.needed + self.fast_layout + SLICED_SLACK <= self.free


def fit(
    shape: Shape,
    weight_bytes: int,
    free: int,
    context: int,
    fast_layout: int = 0,
    unpacked: int = 0,
    reclaimed: int = 0,
    free_known: bool = True,
) -> Fit:
    """weight_bytes: the files' weights; unpacked: what a load adds to them (GPTQ zero points,
    engine/memory.py gptq_zero_bytes); reclaimed: what the engine holds on the GPU now, all of
    which it gives back before a load (its CUDA context stays, and the overhead counts one);
    free_known False: ``free`` is the GPU's total (NVML cannot be read, app/gpu.py).
    The engine keeps the embedding table in host memory where everything would not fit the GPU
    otherwise (engine/memory.py embedding_on_host)."""
    free += reclaimed
    weight_bytes += unpacked
    overhead = shape.overhead()
    kv = shape.kv_bytes_per_token * context
    host = 0
    if embedding_on_host(shape, weight_bytes, context, fast_layout, free, overhead):
        host = min(shape.embedding_bytes(), weight_bytes)
    weights = weight_bytes - host
    largest = shape.largest_context(free - weights - overhead)
    return Fit(weights, kv, overhead, free, context, largest, fast_layout, host, unpacked,
               reclaimed, free_known)  # fmt: skip


@dataclass(frozen=True)
class CpuFit:
    """Without an NVIDIA GPU: what the CPU path takes (every layer expanded to float32; to
    bfloat16 where float32 does not fit, as the engine does) against the memory available now
    (None: unknown)."""

    need: CpuNeed
    available: int | None
    max_context: int  # the largest context that fits (0: not even the weights)
    float32: CpuNeed | None = None  # where float32 does not fit (bfloat16 taken): its figures

    @property
    def verdict(self) -> str | None:
        return None if self.available is None else verdict(self.need.total, self.available)

    def lines(self) -> list[str]:
        out = [f"On the CPU it takes about {self.need.describe()}"]
        if self.available is None:
            return out
        if self.float32 is not None:
            out.append(
                f"In bfloat16: in float32 it would take {gib(self.float32.total)} "
                "(bfloat16 prompts are slower on CPUs without AVX-512 BF16)"
            )
        out.append(f"Needed {gib(self.need.total)} of {gib(self.available)} available")
        if self.max_context:
            out.append(largest_line(self.max_context))
        else:
            out.append("The weights alone do not fit")
        return out


def cpu_fit(
    shape: Shape,
    weight_bytes: int,
    quantized: bool,
    context: int,
    available: int | None,
    gptq: tuple[int, int] | None = None,
) -> CpuFit:
    """As engine/loader.py chooses (memory.cpu_plan): float32, or bfloat16 where only that fits.
    ``gptq``: a GPTQ model's (bits, group size), where the listing knows them."""
    need, float32 = cpu_plan(shape, weight_bytes, quantized, context, available, gptq=gptq)
    largest = 0 if available is None else cpu_largest_context(shape, need, available)
    return CpuFit(need, available, largest, float32)
