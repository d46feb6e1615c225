"""The double-click launcher: a .desktop entry (Linux) or a Start-menu shortcut (Windows) that
starts this environment's ``vptq-chat``. Per user, no administrator rights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from engine.paths import shipped

ICON_SIZES = (16, 24, 32, 48, 64, 128, 256)


class LauncherError(Exception):
    """The launcher could not be installed; the message says what to do."""


def assets() -> Path:
    folder = shipped("assets")
    if not (folder / "icon.svg").exists():
        raise LauncherError(f"{folder}: the app's icons are missing; reinstall VPTQ Chat")
    return folder


def packaging() -> Path:
    folder = shipped("packaging")
    if not (folder / "linux").exists():
        raise LauncherError(f"{folder}: the launcher templates are missing; reinstall VPTQ Chat")
    return folder


def on_windows() -> bool:
    return sys.platform == "win32"


def executable() -> Path:
    """This environment's ``vptq-chat`` (next to its Python), not whatever PATH finds first."""
    names = ("vptq-chat.exe", "vptq-chat-script.pyw") if on_windows() else ("vptq-chat",)
    folder = Path(sys.executable).parent
    for name in names:
        if (folder / name).exists():
            return folder / name
    raise LauncherError(
        f"vptq-chat is not installed in {folder}; run 'pip install -e .' (or 'make run') first"
    )


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def desktop_file() -> Path:
    return data_home() / "applications" / "vptq-chat.desktop"


def icon_files() -> list[tuple[str, Path]]:
    """(file under assets/, where the icon theme wants it)."""
    base = data_home() / "icons" / "hicolor"
    return [("icon.svg", base / "scalable" / "apps" / "vptq-chat.svg")] + [
        (f"icons/vptq-chat-{s}.png", base / f"{s}x{s}" / "apps" / "vptq-chat.png")
        for s in ICON_SIZES
    ]


def render_desktop_entry(exe: Path) -> str:
    template = (packaging() / "linux" / "vptq-chat.desktop.in").read_text()
    quoted = '"' + str(exe).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return template.replace("@EXEC@", quoted).replace("@TRYEXEC@", str(exe))


def install() -> list[Path]:
    """Install the launcher for the current user; returns the files written."""
    exe = executable()
    if on_windows():
        return [_windows("create_shortcut.ps1.in", exe)]
    written = []
    src = assets()
    for name, dest in icon_files():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dest)
        written.append(dest)
    entry = desktop_file()
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(render_desktop_entry(exe))
    written.append(entry)
    _refresh_caches()
    return written


def uninstall() -> list[Path]:
    if on_windows():
        _windows("remove_shortcut.ps1", None)
        return []
    removed = [f for f in [desktop_file(), *(d for _, d in icon_files())] if f.exists()]
    for f in removed:
        f.unlink()
    _refresh_caches()
    return removed


def windows_script(template: str, exe: Path | None) -> str:
    text = (packaging() / "windows" / template).read_text()
    if exe is not None:
        ico = assets() / "icons" / "vptq-chat.ico"
        text = text.replace("@EXEC@", str(exe).replace("'", "''"))
        text = text.replace("@ICON@", str(ico).replace("'", "''"))
    return text


def _windows(template: str, exe: Path | None) -> Path:
    script = windows_script(template, exe)
    result = subprocess.run(
        ["powershell", "-NoProfile", "-ExecutionPolicy", "Bypass", "-Command", script],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise LauncherError(f"creating the Start-menu shortcut failed: {result.stderr.strip()}")
    return (
        Path(os.environ.get("APPDATA", "")) / "Microsoft/Windows/Start Menu/Programs/VPTQ Chat.lnk"
    )


def _refresh_caches() -> None:
    """Let menus notice at once where the tools exist; harmless where they do not."""
    for cmd in (
        ["update-desktop-database", str(desktop_file().parent)],
        ["gtk-update-icon-cache", "-q", "-t", str(data_home() / "icons" / "hicolor")],
    ):
        if shutil.which(cmd[0]):
            subprocess.run(cmd, capture_output=True)
