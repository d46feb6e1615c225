"""The code older GPUs run (an RTX 3090 or 4090, compute capability 8.6 / 8.9; an A100, 8.0; a
Tesla T4 or RTX 2080, 7.5), run on the newer GPU at hand: the GPU tests again in a fresh pytest
with VPTQ_CUDA_ARCH set (engine/ops/arch.py), which compiles the kernels from that generation's
virtual architecture and has the host code and the planners take its capability and shared
memory: no bulk copies, no clusters, no early launches, the PyTorch sampled pick, 99, 163 or
64 KiB of shared memory a block (on Turing the copies into shared memory have no hardware
acceleration)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.ops import arch, cuda
from tests.conftest import LOCKS_ENV

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
# The tests whose code differs by generation: every kernel against its oracle, whole models on
# the GPU against the CPU, graph decode against eager. Not the 8B checkpoint's load (minutes,
# the same Python), nor a test that takes the whole GPU (gpu_alone) beside this one's neighbours.
FILES = ["test_kernels.py", "test_decode_kernels.py", "test_model.py", "test_runtime.py"]


@pytest.mark.gpu_subprocess
@pytest.mark.parametrize("gen", ["86", "80", "75"])
def test_the_gpu_tests_pass_as_an_older_gpu(gen, monkeypatch, gpu_lock_folder):
    if arch.emulated() is not None:
        pytest.skip(f"this run already takes {arch.ENV}={os.environ[arch.ENV]}")
    if torch.cuda.get_device_capability() <= (int(gen[0]), int(gen[1])):
        pytest.skip(f"this GPU is no newer than compute capability {gen[0]}.{gen[1]}")
    # as many workers as the GPU tests run with (8 on a 16-core machine): one generation's run
    # takes about 300 s on an H100 that way, so each fits a call of its own (-k 86, -k 80, -k 75)
    n = max(2, min(8, (os.cpu_count() or 4) // 2))
    workers = ["-n", str(n)] if importlib.util.find_spec("xdist") else []
    # without pytest-benchmark (the GPU machine has it): it warns once a worker under xdist on
    # stderr, and those lines filled the failure's message where the failing tests should be
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
           "-rf", "--tb=short", *workers,
           "-m", "gpu and not gpu_alone", "-k", "not demo and not 8b",
           *(str(ROOT / "tests" / "engine" / f) for f in FILES)]  # fmt: skip
    env = {**os.environ, arch.ENV: gen, LOCKS_ENV: str(gpu_lock_folder)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:] + done.stdout[-6000:]  # the summary last
    assert " passed" in done.stdout.strip().splitlines()[-1], done.stdout[-2000:]
    # they ran on kernels built for the older generation, in a folder of their own
    monkeypatch.setenv(arch.ENV, gen)
    built = cuda.build_dir()
    assert f"-as-sm{gen}-" in built.name, built
    assert any(built.glob("*.so")), built
