"""Shared fixtures: tiny random checkpoints built in a temp dir, the demo model, markers."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

# The CPU float32 path is the oracle of many tests (dense weights against float64 to 1e-5, GPU
# logits against the CPU's): it keeps its expanded weights in float32 here, and in the engines
# the tests start. The float16 weights the engine keeps by default (engine/memory.py
# cpu_half_weights) have tests of their own, which set VPTQ_CPU_WEIGHTS=float16.
os.environ.setdefault("VPTQ_CPU_WEIGHTS", "float32")

try:
    import fcntl
except ImportError:  # Windows: no flock; GPU tests there run without xdist's workers
    fcntl = None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def gpu_lock(folder, alone: bool):
    """Shared hold of the GPU for a test, or the whole GPU for one marked gpu_alone (it takes
    nearly all the GPU's memory, which would make a neighbour's load fail). pytest-xdist's
    workers run tests side by side; they meet at flock()s on files in their common temp folder.
    The turnstile lets a waiting gpu_alone test in before newer shared holds."""
    if fcntl is None:
        yield
        return
    with open(folder / "gpu.turnstile", "a") as gate, open(folder / "gpu.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


LOCKS_ENV = "VPTQ_TEST_GPU_LOCKS"


@pytest.fixture(scope="session")
def gpu_lock_folder(tmp_path_factory) -> Path:
    """Where the GPU tests of this run meet: xdist gives each worker a folder under the run's
    own, the run's is their common one; a pytest run by a test (gpu_subprocess) is handed its
    parent's through VPTQ_TEST_GPU_LOCKS."""
    return Path(os.environ.get(LOCKS_ENV) or tmp_path_factory.getbasetemp().parent)


@pytest.fixture(autouse=True)
def _share_the_gpu(request):
    if "gpu" not in request.keywords or not torch.cuda.is_available():
        yield
        return
    if "gpu_subprocess" in request.keywords:  # its pytest's tests take the lock, one by one
        yield
        return
    alone = "gpu_alone" in request.keywords
    with gpu_lock(request.getfixturevalue("gpu_lock_folder"), alone):
        yield
        if not alone:  # this worker's cached blocks back before a gpu_alone test measures
            torch.cuda.empty_cache()  # what is free (on an 80 GB card they crowded one out)


@pytest.fixture(scope="module")
def cuda_kernels():
    """The compiled kernels, loaded (built on first use) for the GPU tests of a module."""
    from engine import ops

    kind, why = ops.prepare("cuda")
    assert kind == "cuda", why


@pytest.fixture(scope="session")
def demo_path():
    """The dense demo model folder. Both demos are built once into the data folder, as `make
    run` does: tests load `demo` (the VPTQ build) by name in engine processes."""
    from engine.models import build_dense_demo, build_vptq_demo

    build_vptq_demo()
    return build_dense_demo()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_path):
    from engine.tokenizer import Tokenizer

    return Tokenizer(demo_path)


@pytest.fixture
def prefill_log(monkeypatch) -> list[tuple[int, int]]:
    """(tokens, start) of each forward pass (prefill) of any engine Transformer from here on."""
    from engine.model import Transformer

    log: list[tuple[int, int]] = []
    forward = Transformer.forward

    def watched(self, tokens, start=0, last_only=False):
        log.append((tokens.shape[1], start))
        return forward(self, tokens, start, last_only)

    monkeypatch.setattr(Transformer, "forward", watched)
    return log
