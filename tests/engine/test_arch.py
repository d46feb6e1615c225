"""VPTQ_CUDA_ARCH: the kernels built and launched as on an older GPU generation (engine/ops/arch.py,
csrc/vptq_device.cuh compute_major), checked against a faked device on the CPU. On a GPU,
tests/engine/test_older_gpus.py runs the GPU tests with it set (csrc/KERNELS.md session 28)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.ops import arch, cuda

H200 = SimpleNamespace(major=9, minor=0, shared_memory_per_block_optin=232448)
RTX_3090 = SimpleNamespace(major=8, minor=6, shared_memory_per_block_optin=101376)


@pytest.fixture
def device(monkeypatch):
    """Fake the visible GPU: device(props) makes torch report those properties."""

    def use(props):
        monkeypatch.setattr(
            torch.cuda, "get_device_capability", lambda d=None: (props.major, props.minor)
        )
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: props)

    return use


def test_without_the_variable_the_device_is_built_for_as_it_is(device, monkeypatch):
    monkeypatch.delenv(arch.ENV, raising=False)
    device(H200)
    assert arch.capability() == (9, 0)
    assert arch.gencode() == "-gencode=arch=compute_90a,code=sm_90a"
    assert arch.tag() == "sm90"
    assert arch.smem_optin() == 232448
    device(RTX_3090)
    assert arch.gencode() == "-gencode=arch=compute_86,code=sm_86"
    assert (arch.tag(), arch.smem_optin()) == ("sm86", 101376)


@pytest.mark.parametrize("value", ["86", "8.6", " 86 "])
def test_an_older_generation_compiles_its_code_into_the_devices_machine_code(
    device, monkeypatch, value
):
    monkeypatch.setenv(arch.ENV, value)
    device(H200)
    assert arch.capability() == (8, 6)
    # compute_86: the device code of an RTX 3090 (no __CUDA_ARCH__ >= 900 paths); sm_90: runs
    # natively on the H200, no JIT at load
    assert arch.gencode() == "-gencode=arch=compute_86,code=sm_90"
    assert arch.tag() == "sm90-as-sm86"  # its own build folder
    assert arch.smem_optin() == 99 * 1024  # the planners see an RTX 3090's shared memory


def test_a_generation_not_older_than_the_device_changes_nothing(device, monkeypatch):
    monkeypatch.setenv(arch.ENV, "89")
    device(RTX_3090)
    assert arch.capability() == (8, 6) and arch.tag() == "sm86"
    assert arch.gencode() == "-gencode=arch=compute_86,code=sm_86"


@pytest.mark.parametrize("value", ["70", "90", "sm86", "8"])
def test_an_unknown_generation_is_refused_naming_the_variable(device, monkeypatch, value):
    monkeypatch.setenv(arch.ENV, value)
    device(H200)
    with pytest.raises(ValueError, match=f"VPTQ_CUDA_ARCH='{value}' is not one of .*75, 80, 86"):
        arch.capability()


def test_the_build_takes_the_generations_flags_and_folder(device, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("VPTQ_CHAT_HOME", str(tmp_path))
    monkeypatch.setenv(arch.ENV, "89")
    device(H200)
    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.update(kw))
    cuda._build(None)
    assert "-gencode=arch=compute_89,code=sm_90" in seen["extra_cuda_cflags"]
    assert Path(seen["build_directory"]).name.split("-")[2:5] == ["sm90", "as", "sm89"]
    assert Path(seen["build_directory"]).parent == tmp_path / "kernels"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize(("value", "major"), [("86", 8), ("8.9", 8), ("", 0), (None, 0)])
def test_the_host_code_reads_the_variable_as_python_does(tmp_path, value, major):
    """csrc's emulated_major, which caps compute_major (no PDL, clusters or bulk copies are
    launched for code compiled without them), compiled and run without a GPU."""
    import os

    repo = Path(__file__).parents[2]
    src = tmp_path / "t.cu"
    src.write_text(
        '#include <cstdio>\n#include "vptq_device.cuh"\n'
        'int main() { std::printf("%d", vptq::emulated_major()); }\n'
    )
    exe = tmp_path / "t"
    subprocess.run(
        ["nvcc", "-std=c++17", str(src), "-o", str(exe), f"-I{repo / 'csrc'}"],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k != arch.ENV}
    if value is not None:
        env[arch.ENV] = value
    out = subprocess.run([str(exe)], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == major
