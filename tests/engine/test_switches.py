"""The kernels' switches for comparisons (README: VPTQ_PDL=0 and the like), each read once by
the extension (csrc/vptq_device.cuh switched_off / switched_on) into a static, so a pytest of
its own for each: the GPU tests of the kernels a switch changes, run again with it set. Each
alternative path must compute what the default one does, or a benchmark that compares them
measures a wrong kernel."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LOCKS_ENV

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
DECODE = "test_decode_kernels.py"
KERNELS = "test_kernels.py"

# switch, value: the test files and -k selection that take the code it changes
SWITCHES = {
    # no early launch of any kernel: every kernel's wait and trigger, both attention kernels,
    # the sliced GEMV, whole models' decode steps against the CPU
    ("VPTQ_PDL", "0"): ([DECODE, KERNELS], "not demo and not 8b"),
    # the CUDA-core attention loads its first keys after the wait
    ("VPTQ_ATTN_PRELOAD", "0"): ([DECODE], "attention or graph"),
    # the tensor-core attention launched early, reading q and the key at pos as rope_kv
    # writes them
    ("VPTQ_ATTN_TC_PDL", "1"): ([DECODE], "attention or graph"),
    # the codebook slice copied by every thread (cp.async), no clusters of two
    ("VPTQ_SLICED_BULK", "0"): ([KERNELS], "sliced"),
    # single blocks, each with its own copy of the slice
    ("VPTQ_SLICED_PAIRS", "0"): ([KERNELS], "sliced"),
    # the plain GEMV for the wide kernel's layers (test_plain_gemv_takes_the_wide_kernel_...
    # checks that it is the plain kernel that runs)
    ("VPTQ_WIDE_GEMV", "0"): ([KERNELS], "linear or wide or opcheck or graph or whole"),
}


@pytest.mark.gpu_subprocess
@pytest.mark.parametrize("switch", [f"{k}={v}" for k, v in SWITCHES], ids=str)
def test_the_kernel_tests_pass_with_each_comparison_switch(switch, gpu_lock_folder):
    name, value = switch.split("=")
    if os.environ.get(name, value) != value:
        pytest.skip(f"this run already takes {name}={os.environ[name]}")
    files, selection = SWITCHES[(name, value)]
    n = max(2, min(8, (os.cpu_count() or 4) // 2))
    workers = ["-n", str(n)] if importlib.util.find_spec("xdist") else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
           "-rf", "--tb=short", *workers, "-m", "gpu and not gpu_alone",
           "-k", selection, *(str(ROOT / "tests" / "engine" / f) for f in files)]  # fmt: skip
    env = {**os.environ, name: value, LOCKS_ENV: str(gpu_lock_folder)}  # VPTQ_CUDA_ARCH kept
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:] + done.stdout[-6000:]  # the summary last
    last = done.stdout.strip().splitlines()[-1]
    assert " passed" in last and " failed" not in last, done.stdout[-2000:]
