"""Shared fixtures: tiny random checkpoints built in a temp dir, the demo model, markers."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
