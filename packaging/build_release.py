"""Build the release: wheel and sdist into dist/. With --check, install the wheel into a fresh
virtual environment and run ``vptq-chat --version`` from it.

    python packaging/build_release.py [--out DIR] [--check]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--wheel",
            "--sdist",
            "--outdir",
            str(out),
            str(REPO),
        ],
        check=True,
    )
    return next(out.glob("vptq_chat-*.whl")), next(out.glob("vptq_chat-*.tar.gz"))


def check(wheel: Path) -> str:
    """Install ``wheel`` into a new virtual environment; return what `vptq-chat --version` says.

    Dependencies are pinned to the versions of this environment, so the check installs from the
    local package cache and never pulls a different (multi-GB CUDA) build of torch."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pins = Path(tmp) / "constraints.txt"
        frozen = subprocess.run(
            [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        pins.write_text(
            "\n".join(
                line
                for line in frozen.splitlines()
                if not line.lower().startswith(("vptq-chat", "vptq_chat"))
            )
        )
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "-c", str(pins), str(wheel)], check=True)
        exe = venv / ("Scripts" if sys.platform == "win32" else "bin") / "vptq-chat"
        result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
        shipped = venv / "share" / "vptq-chat"
        kernels = [f"csrc/{f.name}" for f in (REPO / "csrc").iterdir() if f.suffix != ".md"]
        for needed in (
            *kernels,  # the engine builds the CUDA kernels from these on first use
            "assets/icon.svg",
            "packaging/linux/vptq-chat.desktop.in",
        ):
            if not (shipped / needed).exists():
                raise SystemExit(f"error: the wheel did not install {needed}")
        return result.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "dist")
    ap.add_argument("--check", action="store_true", help="install the wheel into a fresh venv")
    args = ap.parse_args()
    wheel, sdist = build(args.out)
    print(f"built {wheel.name} and {sdist.name} in {args.out}")
    if args.check:
        print(f"fresh install runs: {check(wheel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
