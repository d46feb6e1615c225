"""``vptq-chat`` / ``python -m app``: build the objects, wire them, run the Qt + asyncio loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("app")


COMMANDS = {
    "install-launcher": "add VPTQ Chat to your applications menu (for this user)",
    "uninstall-launcher": "remove it from the applications menu",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="vptq-chat",
        description="Chat with low-bit LLMs",
        epilog="commands: " + "; ".join(f"{k}: {v}" for k, v in COMMANDS.items()),
    )
    ap.add_argument("command", nargs="?", choices=list(COMMANDS), help=argparse.SUPPRESS)
    ap.add_argument("--version", action="version", version=f"vptq-chat {__version__}")
    ap.add_argument("--model", help="model to load: a folder, a downloaded repo id, or 'demo'")
    ap.add_argument(
        "--theme",
        choices=["system", "light", "dark"],
        default=None,
        help="colour theme (default: follow the system)",
    )
    return ap.parse_args(argv)


def engine_command() -> list[str] | None:
    """$VPTQ_CHAT_ENGINE_CMD replaces `python -m engine serve` (a remote or test engine)."""
    cmd = os.environ.get("VPTQ_CHAT_ENGINE_CMD")
    return shlex.split(cmd) if cmd else None


LOG_LIMIT = 5 << 20  # bytes of a log before it is set aside at the next start


def rotate_log(path: Path, limit: int = LOG_LIMIT) -> None:
    """A log grown past ``limit`` becomes <name>.1 (replacing the one set aside before it), so
    that years of use do not fill the disk with logs; the last sessions' lines are in one of
    the two. Both logs only ever grew: the engine's is appended to at every start."""
    try:
        if path.stat().st_size > limit:
            path.replace(path.with_name(path.name + ".1"))
    except OSError:  # none yet, or not ours to move: the log goes on growing
        pass


def setup_logging(log_dir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    for name in ("app.log", "engine.log"):
        rotate_log(log_dir / name)
    logging.basicConfig(
        level=logging.INFO,
        filename=str(log_dir / "app.log"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def wants_dark(app, theme: str) -> bool:
    """Whether the theme setting ("light", "dark" or "system") asks for the dark palette: the
    system's colour scheme decides "system". (app/ui/colours.py is_dark reads what a widget is
    drawn in.)"""
    from PySide6.QtCore import Qt

    if theme in ("light", "dark"):
        return theme == "dark"
    return app.styleHints().colorScheme() == Qt.ColorScheme.Dark


def apply_theme(app, dark: bool) -> None:
    from PySide6.QtGui import QColor, QPalette

    from .ui.colours import colours

    app.setStyle("Fusion")
    p = QPalette()
    if dark:
        for role, color in [
            ("Window", "#202124"),
            ("WindowText", "#e8eaed"),
            ("Base", "#18191b"),
            ("AlternateBase", "#26282b"),
            ("Text", "#e8eaed"),
            ("Button", "#2d2f33"),
            ("ButtonText", "#e8eaed"),
            ("Highlight", "#5b8def"),
            ("HighlightedText", "#ffffff"),
            ("ToolTipBase", "#2d2f33"),
            ("ToolTipText", "#e8eaed"),
            ("PlaceholderText", "#9aa0a6"),
            ("Mid", "#5f6368"),
            ("Link", "#8ab4f8"),  # the default dark blue is unreadable on the dark window
            ("LinkVisited", "#c58af9"),
        ]:
            p.setColor(getattr(QPalette.ColorRole, role), QColor(color))
        for role in ("WindowText", "Text", "ButtonText"):
            p.setColor(
                QPalette.ColorGroup.Disabled, getattr(QPalette.ColorRole, role), QColor("#6b6f75")
            )
    app.setPalette(p)
    c = colours(dark)
    app.setStyleSheet(
        f"#userMessage {{ background: {c['user']}; border-radius: 8px; }}"
        f"#assistantMessage {{ background: {c['assistant']}; border-radius: 8px; }}"
        "#userMessage QTextBrowser, #assistantMessage QTextBrowser { background: transparent; }"
        f"#warning {{ color: {c['warning']}; }} #ok {{ color: {c['ok']}; }}"
        "#errorBanner { background: #fce8e6; border-radius: 6px; }"
        "#errorBanner QLabel, #errorBanner QToolButton { color: #a50e0e; }"
        f"#messageStats, #emptyHint {{ color: {c['muted']}; }}"
    )


class App:
    """Everything the GUI process is made of, wired together (tests build it too)."""

    def __init__(
        self,
        data: Path,
        model: str | None = None,
        theme: str = "system",
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        from PySide6.QtGui import QIcon
        from PySide6.QtWidgets import QApplication

        from .controller import ChatController
        from .engine_client import EngineClient
        from .event_loop import QtAsyncLoop
        from .gpu import Gpus
        from .settings import Settings
        from .store import Store
        from .ui.main_window import MainWindow

        if loop is not None and not isinstance(loop, QtAsyncLoop):
            raise TypeError(
                f"App runs on app.event_loop.QtAsyncLoop, not on {type(loop).__name__}: qasync's "
                "own loop ends a task woken as run_until_complete stops, and the answer it "
                "was reading then never finishes"
            )
        self.data, self.log_dir = data, data / "logs"
        setup_logging(self.log_dir)
        self.qapp = QApplication.instance() or QApplication(sys.argv[:1])
        self.qapp.setApplicationName("VPTQ Chat")
        self.qapp.setDesktopFileName("vptq-chat")
        from engine.paths import shipped

        icon = shipped("assets") / "icon.svg"
        if icon.exists():
            self.qapp.setWindowIcon(QIcon(str(icon)))
        self.settings = Settings.load(data / "settings.json")
        if model:
            self.settings.model = model
        self.dark = wants_dark(self.qapp, theme)
        apply_theme(self.qapp, self.dark)
        self.store = Store(data / "history.sqlite3")  # StoreError: the caller says so
        self.loop = loop or QtAsyncLoop(self.qapp)
        asyncio.set_event_loop(self.loop)
        self.client = EngineClient(engine_command(), log_path=self.log_dir / "engine.log")
        self.ctrl = ChatController(self.store, self.client, self.settings)
        self.window = MainWindow(self.ctrl, Gpus(), self.settings, self.log_dir, self.dark)
        self.client.on_state = self._engine_state
        self.ctrl.settings_changed.connect(self.save_settings)
        self.window.check_requested.connect(self.show_checks)
        self.window.models_requested.connect(self.show_models)
        self.checks_dialog = None
        self._browser(data)
        if theme == "system":  # follow the system when it switches between light and dark
            self.qapp.styleHints().colorSchemeChanged.connect(self._scheme_changed)

    def _browser(self, data: Path) -> None:
        from engine.paths import hub_models

        from .browser import BrowserController
        from .downloads import DownloadManager
        from .hub import Hub, HubSettings

        s = self.settings
        hub = Hub(HubSettings(s.hub_endpoint, s.hub_proxy, s.hub_offline), data / "hub-cache")
        self.downloads = DownloadManager(hub, hub_models(), loop=self.loop)
        self.browser = BrowserController(hub, self.downloads, self.window.gpus, hub_models())
        self.browser.context = s.context  # the fit check starts at the context last loaded
        self.browser.engine_pid = lambda: self.client.pid
        self.browser.engine_devices = lambda: (
            self.client.hello.get("cuda_devices") or [] if self.client.hello else None
        )
        self.browser.device = lambda: self.settings.device
        self.browser.engine_model = self._engine_model
        self.browser.load_requested.connect(self.window._load)
        self.models_window = None
        self.loop.call_soon(self._restore_downloads)

    def _engine_model(self) -> tuple[str, str] | None:
        """The engine's model for the Models window: ("loaded" or "loading", its folder)."""
        if self.client.state == "loaded":
            return "loaded", self.settings.model
        if self.client.state == "loading":
            return "loading", (self.client.last_load or {}).get("path", "")
        return None

    def _restore_downloads(self) -> None:
        self.downloads.restore()
        self.browser.refresh_local()

    def _hub_settings_saved(self) -> None:
        hs = self.browser.hub.settings
        s = self.settings
        s.hub_endpoint, s.hub_proxy, s.hub_offline = hs.endpoint, hs.proxy, hs.offline
        self.save_settings()

    def show_models(self) -> None:
        """Model > Browse and download models: one window, raised when already open."""
        from .ui.browser import ModelsWindow

        if self.models_window is None:
            self.models_window = ModelsWindow(self.window, self.browser, self._hub_settings_saved)
        self.models_window.show()
        self.models_window.raise_()

    def _scheme_changed(self, scheme) -> None:
        from PySide6.QtCore import Qt

        self.dark = scheme == Qt.ColorScheme.Dark
        apply_theme(self.qapp, self.dark)
        self.window.set_dark(self.dark)

    def _engine_state(self, state: str, info: dict) -> None:
        self.window.on_engine_state(state, info)
        if state == "ready" and not self.settings.first_run_done:
            self.settings.first_run_done = True
            self.save_settings()
            self.show_checks()

    def run_checks(self) -> list:
        """The disk check is of the folder downloads go to (it checked the demo's folder, on
        another disk where VPTQ_CHAT_MODELS moves the downloads)."""
        from engine.paths import hub_models

        from .first_run import run_checks

        return run_checks(self.client.hello, self.window.gpus, hub_models())

    def show_checks(self) -> None:
        """The first-run check (also Help > Check this computer), never modal: one window,
        checked again and brought to the front where it is open (a window more each time)."""
        from .ui.first_run_dialog import FirstRunDialog

        open_one = self.checks_dialog
        if open_one is not None and open_one.isVisible():
            open_one.refresh()
            open_one.raise_()
            open_one.activateWindow()
            return
        self.checks_dialog = FirstRunDialog(self.window, self.run_checks)
        self.checks_dialog.show()

    def activate(self) -> None:
        """Another launch asked this instance to come to the front."""
        w = self.window
        w.showNormal()
        w.raise_()
        w.activateWindow()
        if self.checks_dialog is not None and self.checks_dialog.isVisible():
            self.checks_dialog.raise_()

    async def close(self) -> None:
        self.window.chat.flush_draft()
        self.window.gpu_timer.stop()
        self.downloads.close()  # partial files stay; the next start resumes them
        await self.client.shutdown(timeout=5)
        self.save_settings()
        self.store.close()

    def save_settings(self) -> None:
        """settings.json now, with the window's size and place (a write of a few hundred bytes,
        at a load, a panel shown or hidden, the first-run check, quitting)."""
        self.settings.window = self.window.saved_geometry()
        self.settings.save(self.data / "settings.json")


def launcher_command(command: str) -> int:
    from .launcher import LauncherError, install, uninstall

    try:
        files = install() if command == "install-launcher" else uninstall()
    except LauncherError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verb = "installed" if command == "install-launcher" else "removed"
    print(f"launcher {verb}" + "".join(f"\n  {f}" for f in files))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command:
        return launcher_command(args.command)
    from PySide6.QtWidgets import QApplication, QMessageBox

    from .event_loop import close_on_signals
    from .settings import data_dir
    from .single_instance import InstanceServer, ask_running_instance, server_name
    from .store import StoreError

    data = data_dir()
    QApplication.instance() or QApplication(sys.argv[:1])
    name = server_name(data)
    if ask_running_instance(name):
        print("VPTQ Chat is already running: brought its window to the front", file=sys.stderr)
        return 0
    try:
        app = App(data, args.model, args.theme or os.environ.get("VPTQ_CHAT_THEME", "system"))
    except StoreError as e:
        QMessageBox.critical(None, "VPTQ Chat", str(e))
        return 1
    instance = InstanceServer(name, app.activate)
    app.window.show()
    close_on_signals(app.window.close, app.window)
    closed = asyncio.Event()
    app.qapp.aboutToQuit.connect(closed.set)
    with app.loop:
        app.loop.create_task(app.ctrl.start_engine())
        app.loop.run_until_complete(closed.wait())
        app.loop.run_until_complete(app.close())
    instance.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
