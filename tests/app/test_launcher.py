"""The double-click launcher, single instance, the first-run check and the release build."""

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import launcher
from app.engine_client import EngineClient
from app.first_run import run_checks, verdict
from app.gpu import Gpus

from .conftest import FAKE_ENGINE

REPO = Path(__file__).resolve().parents[2]
X_TOOLS = ("Xvfb", "xdotool", "import")


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def test_install_and_uninstall_the_desktop_entry(xdg):
    written = launcher.install()
    entry = xdg / "applications" / "vptq-chat.desktop"
    assert entry in written
    text = entry.read_text()
    exe = Path(sys.executable).parent / "vptq-chat"
    assert f'Exec="{exe}"' in text and exe.exists()  # this environment's, not PATH's
    assert "Icon=vptq-chat" in text
    for size in launcher.ICON_SIZES:
        png = xdg / "icons" / "hicolor" / f"{size}x{size}" / "apps" / "vptq-chat.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (xdg / "icons/hicolor/scalable/apps/vptq-chat.svg").read_text().startswith("<svg")
    removed = launcher.uninstall()
    assert entry in removed and not entry.exists() and not any((xdg / "icons").rglob("*.png"))


@pytest.mark.skipif(
    shutil.which("desktop-file-validate") is None,
    reason="desktop-file-validate is not installed (Debian: desktop-file-utils)",
)
def test_desktop_entry_validates(xdg):
    launcher.install()
    result = subprocess.run(
        ["desktop-file-validate", str(launcher.desktop_file())], capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout


def test_the_launcher_folders_and_the_tools_it_runs(tmp_path, monkeypatch):
    """Without XDG_DATA_HOME the entry goes under ~/.local/share; after installing, the menu
    and icon caches are refreshed with the tools that exist (and nothing where none does); on
    Windows the shortcut script runs in PowerShell, whose failure is an error with its
    stderr, and the shortcut lands in the user's Start menu."""
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    apps = tmp_path / "home" / ".local" / "share" / "applications"
    assert launcher.desktop_file() == apps / "vptq-chat.desktop"
    ran = []

    def run(cmd, **kwargs):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, ran_status, "", "Access is denied.")

    ran_status = 0
    monkeypatch.setattr(launcher.subprocess, "run", run)
    tools = ("update-desktop-database", "gtk-update-icon-cache")
    monkeypatch.setattr(launcher.shutil, "which", lambda n: f"/usr/bin/{n}" if n in tools else None)
    launcher.install()
    icons = tmp_path / "home" / ".local" / "share" / "icons" / "hicolor"
    assert ran == [["update-desktop-database", str(apps)],
                   ["gtk-update-icon-cache", "-q", "-t", str(icons)]]  # fmt: skip
    ran.clear()
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)
    launcher.uninstall()
    assert ran == [] and not (apps / "vptq-chat.desktop").exists()
    monkeypatch.setattr(launcher, "on_windows", lambda: True)  # not sys.platform itself
    monkeypatch.setattr(launcher, "executable", lambda: Path("C:/env/Scripts/vptq-chat.exe"))
    monkeypatch.setenv("APPDATA", "C:/Users/me/AppData/Roaming")
    (link,) = launcher.install()
    assert link == Path("C:/Users/me/AppData/Roaming/Microsoft/Windows/Start Menu/Programs/"
                        "VPTQ Chat.lnk")  # fmt: skip
    assert ran[-1][:4] == ["powershell", "-NoProfile", "-ExecutionPolicy", "Bypass"]
    assert "$link.TargetPath = 'C:/env/Scripts/vptq-chat.exe'" in ran[-1][-1]
    ran_status = 1
    with pytest.raises(launcher.LauncherError, match="shortcut failed: Access is denied"):
        launcher.install()


def test_windows_shortcut_script():
    script = launcher.windows_script("create_shortcut.ps1.in", Path("C:/env/Scripts/vptq-chat.exe"))
    assert "$link.TargetPath = 'C:/env/Scripts/vptq-chat.exe'" in script
    assert "GetFolderPath('Programs')" in script  # the user's Start menu: no admin rights
    ico = script.split("$link.IconLocation = '")[1].split("'")[0]
    assert Path(ico).exists() and Path(ico).read_bytes()[:4] == b"\x00\x00\x01\x00"


GiB = 1 << 30


def cuda_hello(gpu: str) -> dict:
    """An engine's hello on one CUDA GPU named ``gpu`` with the kernels built."""
    return {
        "device": "cuda", "torch": "2.11.0", "kernels": "cuda", "kernels_reason": "built",
        "cuda_devices": [{"index": 0, "name": gpu, "uuid": "aaaa"}],
    }  # fmt: skip


def checks_by_name(hello: dict, gpus, tmp_path) -> dict:
    """run_checks' checks by name, with no CPU memory figure (0)."""
    return {c.name: c for c in run_checks(hello, gpus, tmp_path / "models", 0)}


def test_first_run_verdict_without_a_gpu(tmp_path):
    """On this machine (no NVIDIA driver, CPU PyTorch) the real engine's hello and NVML give
    the CPU-path verdicts, each problem with what to do."""

    async def hello():
        c = EngineClient(log_path=tmp_path / "engine.log")
        info = await c.start()
        await c.shutdown()
        return info

    info = asyncio.run(hello())
    gpus = Gpus()
    if gpus.available:
        pytest.skip("this machine has an NVIDIA driver")
    checks = {c.name: c for c in run_checks(info, gpus, tmp_path / "models")}
    assert checks["NVIDIA driver"].ok is False and "runs on the CPU" in checks["NVIDIA driver"].fix
    assert (
        checks["PyTorch with CUDA"].ok is False and "CUDA build" in checks["PyTorch with CUDA"].fix
    )
    import torch

    assert checks["PyTorch with CUDA"].detail == f"PyTorch {torch.__version__} cannot use a GPU"
    unknown = {c.name: c for c in run_checks({**info, "torch": None}, gpus, tmp_path / "models")}
    assert unknown["PyTorch with CUDA"].detail == "PyTorch cannot use a GPU"  # not "PyTorch ?"
    assert checks["CUDA kernels"].ok is None  # not needed on the CPU path
    memory = checks["Memory for the CPU path"]  # this machine's, read from the system
    assert memory.ok is not None and " available: models of up to " in memory.detail
    # 2.5 bytes a parameter: 64 GiB hold 27.5 B parameters, 16 GiB 6.9 B (not a 7B model)
    for available, ok, size in [(64 * GiB, True, "about 27B"), (16 * GiB, False, "about 6.9B"),
                                (2 * GiB, False, "under 1B")]:  # fmt: skip
        c = {c.name: c for c in run_checks(info, gpus, tmp_path / "models", available)}
        m = c["Memory for the CPU path"]
        assert m.ok is ok and f"available: models of up to {size} parameters fit" in m.detail
        assert m.fix.startswith("The smallest VPTQ-community models (7B) need about 16.30 GiB") == (
            not ok
        )
    c = {c.name: c for c in run_checks(info, gpus, tmp_path / "models", None)}
    assert c["Memory for the CPU path"].ok is None and "does not say" in (
        c["Memory for the CPU path"].detail
    )
    assert checks["Disk space for models"].ok is not None
    assert verdict(list(checks.values())).startswith("No usable GPU: VPTQ Chat runs on the CPU")


def test_first_run_says_which_gpus_the_engine_sees(tmp_path):
    """Each GPU the driver reports, with the engine's number for it (matched by UUID: the
    orders can differ), or that the engine does not see it and what to do."""
    from app.gpu import GpuInfo

    class TwoGpus:
        available, driver, error = True, "580.1", None

        def read(self, engine_pid=None):
            return [
                GpuInfo(0, "GPU-AAAA", "Big", 24 * GiB, 8 * GiB, 16 * GiB, 0, 40),
                GpuInfo(1, "GPU-BBBB", "Hidden", 8 * GiB, 0, 8 * GiB, 0, 40),
            ]

    hello = cuda_hello("Big")
    checks = checks_by_name(hello, TwoGpus(), tmp_path)
    assert (checks["GPU 0"].ok, checks["GPU 0"].detail) == (
        True, "Big: 16.0 GiB free of 24.0 GiB; the engine's cuda:0"
    )  # fmt: skip
    hidden = checks["GPU 1"]
    assert (hidden.ok, hidden.detail) == (False, "Hidden: 8.0 GiB free of 8.0 GiB; the engine "
                                          "does not see it")  # fmt: skip
    assert hidden.fix.startswith("CUDA_VISIBLE_DEVICES hides it from the engine")
    assert verdict(list(checks.values())).startswith("Ready")  # the other GPU serves
    # before the engine's hello (or without CUDA) the GPUs are listed as the driver has them
    bare = checks_by_name({}, TwoGpus(), tmp_path)
    assert bare["GPU 1"].ok is True and bare["GPU 1"].detail == "Hidden: 8.0 GiB free of 8.0 GiB"


def test_first_run_disk_space_missing_gpus_and_the_cpu_memory_edges(tmp_path, monkeypatch):
    """The checks' edges by hand: 10 GiB free holds models and a byte less does not; a driver
    that lists no GPU, or none at all, says so; the CPU path fits 7B models from 7e9 x 2.5
    bytes, and sizes read "under 1B", "about 9.9B", "about 10B"."""
    from collections import namedtuple

    from app import first_run
    from app.first_run import MIN_FREE_DISK, cpu_memory

    usage = namedtuple("usage", "total used free")

    class NoGpu:
        available, driver, error = True, "580.1", None

        def read(self, engine_pid=None):
            return []

    class NoDriver:
        available, driver, error = False, None, None

        def read(self, engine_pid=None):
            return []

    hello = {"device": "cpu", "torch": "2.13.0"}
    short = " (under the 10 GiB the models need)"
    where = tmp_path / "models"
    for free, ok, detail in [
        (MIN_FREE_DISK, True, f"10.0 GiB free in {where}"),
        (MIN_FREE_DISK - 1, False, f"9.9 GiB free in {where}{short}"),  # rounded down
        (3 * GiB // 2, False, f"1.5 GiB free in {where}{short}"),
        (3 * GiB // 2 - 1, False, f"1.4 GiB free in {where}{short}"),
        (20 * GiB - 1, True, f"19.9 GiB free in {where}"),
    ]:
        monkeypatch.setattr(first_run.shutil, "disk_usage", lambda p, f=free: usage(0, 0, f))
        checks = {c.name: c for c in run_checks(hello, NoGpu(), where, 0)}
        disk = checks["Disk space for models"]
        assert (disk.ok, disk.detail) == (ok, detail)
        assert disk.fix.startswith("Models need 2-40 GiB each: free some space") == (not ok)
    assert checks["NVIDIA driver"].ok is True and checks["NVIDIA driver"].detail == "driver 580.1"
    gpu = checks["GPU"]
    assert (gpu.ok, gpu.detail) == (False, "the driver reports no GPU")
    assert gpu.fix.startswith("Check that the GPU is seated")
    driver = checks_by_name(hello, NoDriver(), tmp_path)
    assert (driver["NVIDIA driver"].ok, driver["NVIDIA driver"].detail) == (False, "not found")
    assert "GPU" not in driver
    fits = int(7e9 * 2.5)
    assert cpu_memory(fits).ok is True and cpu_memory(fits - 1).ok is False
    for params, size in [(0.99e9, "under 1B"), (1e9, "about 1.0B"), (9.9e9, "about 9.9B"),
                         (10e9, "about 10B")]:  # fmt: skip
        assert f"models of up to {size} parameters fit" in cpu_memory(int(params * 2.5)).detail


def _windows(display, title="VPTQ Chat"):
    out = subprocess.run(
        ["xdotool", "search", "--onlyvisible", "--name", f"^{title}$"],
        capture_output=True,
        text=True,
        env={**os.environ, "DISPLAY": display},
    )
    return out.stdout.split()


def _start_xvfb():
    """A virtual X display on a free number, once it accepts connections: Xvfb writes the
    number to -displayfd when ready (an app started before that cannot connect, and a fixed
    number may be held by another Xvfb)."""
    r, w = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(w), "-screen", "0", "1280x800x24"],
        pass_fds=(w,),
        stderr=subprocess.DEVNULL,
    )
    os.close(w)
    with os.fdopen(r) as ready:
        number = ready.readline().strip()  # "" if Xvfb exited without a display
    assert number, f"Xvfb did not start (exit status {xvfb.poll()})"
    return f":{number}", xvfb


@pytest.mark.e2e
@pytest.mark.skipif(
    any(shutil.which(t) is None for t in X_TOOLS),
    reason="needs Xvfb, xdotool and ImageMagick's import",
)
def test_launcher_opens_one_window_under_xvfb(xdg, tmp_path):
    launcher.install()
    exec_line = next(
        line
        for line in launcher.desktop_file().read_text().splitlines()
        if line.startswith("Exec=")
    )
    command = exec_line.removeprefix("Exec=").strip('"')
    display, xvfb = _start_xvfb()
    env = {
        **os.environ,
        "DISPLAY": display,
        "VPTQ_CHAT_DATA": str(tmp_path / "data"),
        "VPTQ_CHAT_ENGINE_CMD": f"{sys.executable} {FAKE_ENGINE}",
    }
    env.pop("QT_QPA_PLATFORM", None)  # a real X11 window this time
    first = subprocess.Popen([command], env=env)
    try:
        end = time.monotonic() + 60
        while not _windows(display) and time.monotonic() < end:
            time.sleep(0.3)
        windows = _windows(display)
        assert windows, "no main window appeared"
        time.sleep(2)  # the engine starts and the demo model loads
        shot = tmp_path / "launcher.png"
        subprocess.run(["import", "-window", "root", str(shot)], env=env, check=True)
        keep = os.environ.get("VPTQ_CHAT_SCREENSHOTS")
        if keep:
            shutil.copy(shot, Path(keep) / "launcher.png")
        assert shot.stat().st_size > 10_000  # a real picture, not an empty screen
        second = subprocess.run([command], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0 and "already running" in second.stderr
        assert _windows(display) == windows  # no second window
        engines = subprocess.run(
            ["pgrep", "-fc", str(FAKE_ENGINE)], capture_output=True, text=True
        ).stdout.strip()
        assert engines == "1"  # and no second engine
    finally:
        first.terminate()
        first.wait(20)
        xvfb.terminate()


@pytest.mark.slow
def test_release_wheel_installs_and_runs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "packaging" / "build_release.py"),
            "--out",
            str(tmp_path / "dist"),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fresh install runs: vptq-chat 0.1.0" in result.stdout
    assert list((tmp_path / "dist").glob("vptq_chat-0.1.0.tar.gz"))


def test_the_wheel_ships_every_file_the_kernel_build_reads():
    import fnmatch
    import re

    from engine.ops import cuda

    text = (REPO / "pyproject.toml").read_text()  # tomllib is not in Python 3.10
    line = re.search(r'^"share/vptq-chat/csrc" = \[(.*)\]$', text, re.M)
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    needed = [f"csrc/{name}" for name in cuda.SOURCES + cuda.HEADERS]
    missing = [f for f in needed if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not missing  # vptq_device.cuh was left out of the wheel until session 6
    on_disk = {f"csrc/{f.name}" for f in (REPO / "csrc").iterdir() if f.suffix != ".md"}
    assert on_disk == set(needed)  # nothing in csrc/ that the build does not list


def test_first_run_where_cuda_works_without_nvml(tmp_path):
    """A GPU the engine uses while NVML cannot be read (a container without the driver's
    libraries): the driver is not called missing, with advice to install it and run on the
    CPU; what is missing is the GPU monitoring, said with what it costs and what to do."""

    class NoNvml:
        available, driver, reason = False, None, "NVML Shared Library Not Found"
        error = f"No NVIDIA GPU driver found ({reason}); the engine runs on the CPU."

        def read(self, engine_pid=None):
            return []

    hello = cuda_hello("NVIDIA H100")
    checks = checks_by_name(hello, NoNvml(), tmp_path)
    assert (checks["NVIDIA driver"].ok, checks["NVIDIA driver"].detail) == (
        True, "CUDA works: NVIDIA H100"
    )  # fmt: skip
    nvml = checks["GPU monitoring (NVML)"]
    assert nvml.ok is False and nvml.detail == "NVML Shared Library Not Found"
    assert "live panel" in nvml.fix and "the whole card" in nvml.fix
    assert verdict(list(checks.values())).startswith("Ready")
    checks = checks_by_name({**hello, "cuda_devices": []}, NoNvml(), tmp_path)
    assert checks["NVIDIA driver"].ok is False and "GPU monitoring (NVML)" not in checks
