"""The main window: conversations on the left, the chat in the middle, the live panel right."""

from __future__ import annotations

import asyncio
import json
import re
import unicodedata
from pathlib import Path

from PySide6.QtCore import QByteArray, QModelIndex, QSize, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import (
    QAction,
    QColor,
    QDesktopServices,
    QFont,
    QFontMetrics,
    QGuiApplication,
    QKeySequence,
    QPalette,
)
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QLabel,
    QLineEdit,
    QListView,
    QMainWindow,
    QMenu,
    QMessageBox,
    QPushButton,
    QSplitter,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QVBoxLayout,
    QWidget,
)

from ..browser import size_text
from ..controller import RESTART_HINT, ChatController
from ..gpu import Gpus
from ..hub import model_label
from ..settings import Settings
from ..store import MATCH_CLOSE, MATCH_OPEN, StoreError
from .banner import ErrorBanner
from .chat_settings import ChatSettings
from .chat_view import ChatView
from .colours import colour
from .fonts import NORMAL, STEPS, CtrlWheel, clamp, next_size, scaled_font, set_text_size
from .live_panel import LivePanel, gib
from .models import GroupRole, IdRole, SnippetRole
from .screen import fit_to_screen

MAX_IMPORT_BYTES = 256 << 20  # a chat export is text: a larger file is the wrong one
CHAT_FLOOR = 300  # px at the normal text size: below it the live panel folds away (_fit_panes)


def file_name(title: str) -> str:
    """``title`` as a file name on any system: no path separators or characters Windows
    refuses, no trailing dots or spaces, at most 100 characters."""
    name = " ".join(re.sub(r'[\\/:*?"<>|\x00-\x1f]', " ", title).split()).rstrip(". ")
    return name[:100].rstrip(". ") or "chat"


class ChatList(QListView):
    """The chat list; the arrow keys (and Home, End, Page Up/Down) open the chat they move to,
    as a click does (before, the keyboard could not open a chat). Rows that move because the
    list changed (a delete, a search) open nothing. Delete asks to delete the open chat; a
    right click offers what the Chat menu does for the chat under the mouse."""

    picked = Signal(QModelIndex)
    delete_requested = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.menu_actions: list[QAction] = []  # the window's Rename, Delete, Export...

    def contextMenuEvent(self, event) -> None:
        index = self.indexAt(event.pos())
        if not index.isValid() or not self.menu_actions:
            return
        if index != self.currentIndex():
            self.setCurrentIndex(index)
            self.picked.emit(index)
        QMenu.exec(self.menu_actions, event.globalPos(), None, self)

    def keyPressEvent(self, event) -> None:
        if event.key() == Qt.Key.Key_Delete and self.state() != self.State.EditingState:
            self.delete_requested.emit()
            return
        before = self.currentIndex()
        super().keyPressEvent(event)
        now = self.currentIndex()
        if now.isValid() and now != before and self.state() != self.State.EditingState:
            self.picked.emit(now)


def snippet_parts(snippet: str) -> list[tuple[str, bool]]:
    """A search snippet (app/store.py) as (text, matched) pieces, on one line."""
    text = " ".join(snippet.split())
    parts = []
    for i, piece in enumerate(re.split(f"[{MATCH_OPEN}{MATCH_CLOSE}]", text)):
        if piece:
            parts.append((piece, i % 2 == 1))  # every other piece sits between the marks
    return parts


def bold_of(font: QFont) -> QFont:
    """``font`` in bold (the search's matched words, the chat list's headings)."""
    bold = QFont(font)
    bold.setBold(True)
    return bold


def fit_snippet(parts: list[tuple[str, bool]], width: int, font: QFont) -> list[tuple[str, bool]]:
    """``parts`` as a row ``width`` px wide shows them: where the line is longer than the row and
    text comes before the first match, that text loses its start ("…and then the") so that the
    match begins within the row's first third (a match late in the snippet was cut off at the
    row's end, and with it the reason the chat was found)."""
    if len(parts) < 2 or parts[0][1]:
        return parts
    plain, bold = QFontMetrics(font), QFontMetrics(bold_of(font))
    if sum((bold if m else plain).horizontalAdvance(p) for p, m in parts) <= width:
        return parts
    lead = plain.elidedText(parts[0][0], Qt.TextElideMode.ElideLeft, width // 3)
    return [(lead, False), *parts[1:]]


def right_to_left(text: str) -> bool:
    """Whether ``text`` reads right to left (Arabic, Hebrew, ...): its first letter with a
    direction of its own says, as Unicode's rule for a paragraph has it (and the chat's messages
    follow it)."""
    for ch in text:
        kind = unicodedata.bidirectional(ch)
        if kind == "L":
            return False
        if kind in ("R", "AL"):
            return True
    return False


class ChatListItem(QStyledItemDelegate):
    """A chat in the list, under a heading where its time group starts (Today, Yesterday, ...:
    a long list was one run of titles); during a search, with a line of its best match under
    the title, the matched words in bold (the list showed titles alone: why a chat matched was
    not shown)."""

    @staticmethod
    def heading_height(option) -> int:
        return option.fontMetrics.lineSpacing() + 10  # apart from the chat above

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.row_height: tuple[str, int] = ("", 0)  # a title row's height, for a font (key)

    def initStyleOption(self, option, index) -> None:
        """A title that reads right to left is laid out so, against the row's right edge: it
        was laid out left to right, its ellipsis at its start and its last mark at its right."""
        super().initStyleOption(option, index)
        if right_to_left(option.text):
            option.direction = Qt.LayoutDirection.RightToLeft

    def sizeHint(self, option, index) -> QSize:
        # each row is asked for at each layout (a chat sent to the top): a title row's height
        # is measured once a font (3000 chats took 145 ms a layout, measured each)
        if self.row_height[0] != option.font.key():
            self.row_height = (option.font.key(), super().sizeHint(option, index).height())
        size = QSize(option.rect.width(), self.row_height[1])
        heading, snippet = index.model().extra_lines(index.row())
        if snippet:
            size.setHeight(size.height() + option.fontMetrics.lineSpacing() + 6)  # apart
        if heading:
            size.setHeight(size.height() + self.heading_height(option))
        return size

    def paint(self, painter, option, index) -> None:
        if group := index.data(GroupRole):  # the heading, then the chat below it
            head = self.heading_height(option)
            font = bold_of(option.font)
            painter.save()
            painter.setFont(font)
            painter.setPen(QColor(colour("muted", option.widget)))
            box = option.rect.adjusted(4, 0, -3, 0)
            box.setHeight(head - 2)
            align = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignBottom
            shown = QFontMetrics(font).elidedText(group, Qt.TextElideMode.ElideRight, box.width())
            painter.drawText(box, align, shown)
            painter.restore()
            option = QStyleOptionViewItem(option)
            option.rect = option.rect.adjusted(0, head, 0, 0)
        snippet = index.data(SnippetRole)
        if not snippet:
            super().paint(painter, option, index)
            return
        opt = QStyleOptionViewItem(option)
        self.initStyleOption(opt, index)
        title, opt.text = opt.text, ""
        style = opt.widget.style() if opt.widget else QApplication.style()
        style.drawControl(QStyle.ControlElement.CE_ItemViewItem, opt, painter, opt.widget)
        selected = bool(opt.state & QStyle.StateFlag.State_Selected)
        role = QPalette.ColorRole.HighlightedText if selected else QPalette.ColorRole.Text
        text = opt.palette.color(role)
        rect = style.subElementRect(QStyle.SubElement.SE_ItemViewItemText, opt, opt.widget)
        rect = rect.adjusted(3, 0, -3, 0)
        fm = opt.fontMetrics
        top = rect.y() + (rect.height() - 2 * fm.lineSpacing()) // 2 + fm.ascent()  # 1st line
        painter.save()
        rtl = Qt.LayoutDirection.RightToLeft
        painter.setLayoutDirection(opt.direction)
        painter.setFont(opt.font)
        painter.setPen(text)
        shown = fm.elidedText(title, Qt.TextElideMode.ElideRight, rect.width())
        x = (
            rect.x() + rect.width() - fm.horizontalAdvance(shown)
            if opt.direction == rtl
            else rect.x()
        )
        painter.drawText(x, top, shown)
        muted = text if selected else QColor(colour("muted", opt.widget))
        parts = snippet_parts(snippet)
        # a snippet that reads right to left goes from the row's right edge leftwards
        back = right_to_left("".join(p for p, _ in parts))
        painter.setLayoutDirection(rtl if back else Qt.LayoutDirection.LeftToRight)
        left, right, y = rect.x(), rect.x() + rect.width(), top + fm.lineSpacing()
        for piece, matched in fit_snippet(parts, rect.width(), opt.font):  # the words in bold,
            font = bold_of(opt.font) if matched else opt.font  # the rest muted
            painter.setFont(font)
            painter.setPen(text if matched else muted)
            metrics = QFontMetrics(font)
            shown = metrics.elidedText(piece, Qt.TextElideMode.ElideRight, right - left)
            width = metrics.horizontalAdvance(shown)
            painter.drawText(right - width if back else left, y, shown)
            if back:
                right -= width
            else:
                left += width
            if shown != piece or left >= right:
                break
        painter.restore()


class MainWindow(QMainWindow):
    check_requested = Signal()  # Help > Check this computer
    models_requested = Signal()  # Model > Browse models

    def __init__(
        self,
        ctrl: ChatController,
        gpus: Gpus,
        settings: Settings,
        log_dir: Path,
        dark: bool = False,
    ):
        super().__init__()
        self.ctrl, self.gpus, self.settings, self.log_dir = ctrl, gpus, settings, log_dir
        self.tasks: set[asyncio.Task] = set()  # keep running tasks referenced until done
        self.crash: str | None = None  # what the engine's crash said, until its restart ends
        self.file_dir = Path.home()  # where Export and Import open: the last folder used
        # the text size the app closed with, before any widget is laid out in another
        settings.text_size = clamp(settings.text_size)  # a hand-edited 500: the largest
        # no widget of it is polished yet: the font alone (set_text_size sets the style sheet
        # again, which apply_theme has just set)
        QApplication.instance().setFont(scaled_font(settings.text_size))
        self.setWindowTitle("VPTQ Chat")
        self._place(settings.window)
        self.chat = ChatView(ctrl.messages, dark)
        self.panel = LivePanel()
        self.panel.show_history(ctrl.store.recent_answer_stats())
        self.chat_settings = ChatSettings()
        self.banner = ErrorBanner()
        self.search = QLineEdit(placeholderText="Search chats (Ctrl+F)")
        self.search.setAccessibleName("Search chats")
        self.search.setClearButtonEnabled(True)
        self.list = ChatList()
        self.list.setModel(ctrl.conversations)
        self.list.setAccessibleName("Conversations")
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        # not uniform: a chat that starts a time group has its heading above it
        self.list.setItemDelegate(ChatListItem(self.list))
        new = QPushButton("New chat")
        new.setAccessibleName("New chat")
        new.clicked.connect(ctrl.new_conversation)
        side = QWidget()
        sl = QVBoxLayout(side)
        sl.setContentsMargins(6, 6, 0, 6)
        # said when a search finds nothing, where an empty list looked like lost chats
        self.no_match = QLabel(wordWrap=True, visible=False, objectName="emptyHint")
        self.no_match.setAccessibleName("Search result")
        for w in (new, self.search, self.no_match, self.list):
            sl.addWidget(w)
        middle = QWidget()
        ml = QVBoxLayout(middle)
        ml.setContentsMargins(6, 6, 6, 6)
        for w in (self.banner, self.chat_settings):
            ml.addWidget(w)
        ml.addWidget(self.chat, 1)
        self.split = split = QSplitter()
        for w in (side, middle, self.panel):
            split.addWidget(w)
        split.setSizes([230, 720, 250])
        split.setStretchFactor(1, 1)
        side.setMinimumWidth(150)
        self.user_sized = False  # a dragged handle: the panes keep the user's widths
        split.splitterMoved.connect(lambda *_: setattr(self, "user_sized", True))
        self.setCentralWidget(split)
        # The status bar from the start: made by the first message, it moved everything above it
        self.statusBar()
        self.panel.setVisible(settings.show_panel)
        self._menus()
        self._wire()
        self.gpu_timer = QTimer(self, interval=1000)
        self.gpu_timer.timeout.connect(self._poll)
        self.gpu_timer.start()
        self._poll()
        if ctrl.conversations.rowCount():
            self.list.setCurrentIndex(ctrl.conversations.index(0))
            ctrl.open(ctrl.conversations.rows[0].id)
        else:
            self._show_next_chat_settings()

    def _place(self, saved: str) -> None:
        """Where the window was when the app last closed (``saved``: saved_geometry()); the first
        time, 1200 x 780 where the screen's free area allows (it was 1200 x 780 on any screen,
        taller than a 1366 x 768 laptop's), centred."""
        if saved and self.restoreGeometry(QByteArray.fromBase64(saved.encode("ascii"))):
            return
        fit_to_screen(self, 1200, 780)

    def saved_geometry(self) -> str:
        """The window's size, place and maximised state, for Settings.window."""
        return bytes(self.saveGeometry().toBase64()).decode("ascii")

    def resizeEvent(self, event) -> None:  # Qt calls it on every resize
        super().resizeEvent(event)
        self._fit_panes()
        self.chat_settings.set_room(self.centralWidget().height())

    def closeEvent(self, event) -> None:
        QApplication.instance().removeEventFilter(self.ctrl_wheel)  # (a filter of every event)
        super().closeEvent(event)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        # a window shown at its saved size had no resize once its panes were laid out: they
        # kept their floors (160 and 190 px in a 1200 px window)
        self._fit_panes()

    def _fit_panes(self, keep_panel: bool = False) -> None:
        """The chat list and the live panel take a share of the width, between a floor and their
        full widths (230 and 250 px at the normal text size, wider for larger text: the panel's
        lines were cut at its edge), so that in a small window the chat keeps most of it;
        widths the user dragged stay. The panel's floor holds its widest word (at 200% its
        heading "Throughput" was wider than the floor, and every line ran past the edge).
        Where the panes' floors would leave the chat less than CHAT_FLOOR (more for larger
        text: 424 px at 200%, where 320 px held 15 characters a line), the panel folds away
        until the window is wider again (in a 560 px window the chat had 200 px), unless
        ``keep_panel``: View > Live panel asked for it just now."""
        if self.user_sized:
            return
        sizes = self.split.sizes()
        total, scale = sum(sizes), max(1.0, self.settings.text_size / NORMAL)
        side = max(160, min(round(230 * scale), round(total * 0.22)))
        panel = round(max(190, self.panel.least_width(), min(250 * scale, total * 0.25)))
        narrow = total - side - panel < CHAT_FLOOR * scale**0.5 and not keep_panel
        panel = 0 if self.panel.isHidden() or narrow else panel
        self.split.setSizes([side, total - side - panel, panel])
        if action := getattr(self, "panel_action", None):  # (made after the first resize)
            action.setChecked(panel > 0)  # folded: one click on View > Live panel shows it

    def _show_panel(self, on: bool) -> None:
        self.panel.setVisible(on)
        self.settings.show_panel = on
        self.ctrl.settings_changed.emit()
        self._fit_panes(keep_panel=on)

    def _text_size(self, way: int) -> None:
        """View > Larger text (``way`` 1), Smaller text (-1), Normal text size (0): every
        window's text, kept for the next start."""
        size = next_size(self.settings.text_size, way) if way else NORMAL
        self.chat.keep_place()
        set_text_size(size)
        self.settings.text_size = size
        self.ctrl.settings_changed.emit()
        self._text_size_limits()
        self._fit_panes()
        self.statusBar().showMessage(f"Text size {size}%", 3000)

    def _text_size_limits(self) -> None:
        """Larger and Smaller text do nothing past the sizes' ends: disabled there."""
        larger, smaller, normal = self.text_size_actions
        larger.setEnabled(self.settings.text_size < STEPS[-1])
        smaller.setEnabled(self.settings.text_size > STEPS[0])
        normal.setEnabled(self.settings.text_size != NORMAL)

    def _show_next_chat_settings(self) -> None:
        """With no chat open the panel holds what the next new chat starts with (the app's
        defaults with the model's recommended settings over them, until edited), not the
        fields' minimums."""
        self.chat_settings.load(self.settings.system_prompt, self.ctrl.chat_defaults())

    def _default_sampling(self) -> None:
        """Chat settings > Defaults: this chat's sampling (or the next chat's) as a new chat's."""
        system, _ = self.chat_settings.values()
        self.chat_settings.load(system, self.ctrl.chat_defaults())
        self.ctrl.update_settings(*self.chat_settings.values())

    def _menus(self) -> None:
        def act(menu, text, slot, shortcut=None):
            a = QAction(text, self)
            if shortcut:
                a.setShortcut(QKeySequence(shortcut))
            a.triggered.connect(slot)
            menu.addAction(a)
            return a

        m = self.menuBar().addMenu("&File")
        act(m, "&New chat", self.ctrl.new_conversation, "Ctrl+N")
        act(m, "&Import chat (JSON)…", self._import)
        act(m, "Export chat as &Markdown…", lambda: self._export("md"))
        act(m, "Export chat as &JSON…", lambda: self._export("json"))
        m.addSeparator()
        act(m, "&Quit", self.close, "Ctrl+Q")
        m = self.menuBar().addMenu("&Chat")
        act(m, "&Search", self.search.setFocus, "Ctrl+F")
        act(m, "&Rename", self._rename, "F2")
        act(m, "&Delete…", self._delete)  # Delete in the chat list (not a window shortcut: typing)
        m.addSeparator()
        # the last answer's buttons, from the keyboard (each does nothing where it does not apply)
        chat = self.chat
        answer = [
            act(m, "Re&generate answer", chat.regenerate_requested.emit, "Ctrl+R"),
            act(m, "C&ontinue answer", chat.continue_requested.emit),
            act(m, "&Earlier answer", lambda: chat.version_requested.emit(-1), "Alt+Left"),
            act(m, "&Later answer", lambda: chat.version_requested.emit(1), "Alt+Right"),
        ]
        chat.answer_actions.connect(
            lambda *on: [a.setEnabled(enabled) for a, enabled in zip(answer, on, strict=True)]
        )
        chat.refresh_buttons()  # the actions' first state (no chat open: none applies)
        act(m, "&Copy last answer", self._copy_last_answer, "Ctrl+Shift+C")
        # the chat list's right-click menu (without the shortcuts' text, as a context menu is)
        self.list.menu_actions = [
            QAction("Rename", self, triggered=self._rename),
            QAction("Export as Markdown…", self, triggered=lambda: self._export("md")),
            QAction("Export as JSON…", self, triggered=lambda: self._export("json")),
            QAction("Delete…", self, triggered=self._delete),
        ]
        m = self.menuBar().addMenu("&Model")
        act(m, "&Browse and download models…", self.models_requested.emit, "Ctrl+M")
        act(m, "Load &demo model", lambda: self._load("demo"))
        act(m, "Load model &folder…", self._load_folder)
        # frees the GPU (for a game, another program) without quitting the app
        self.unload_action = act(m, "&Unload model", lambda: self._spawn(self._unload()))
        self.unload_action.setEnabled(False)
        m.addSeparator()
        act(m, "&Restart engine", lambda: self._spawn(self.ctrl.restart_engine()))
        m = self.menuBar().addMenu("&View")
        a = self.panel_action = act(m, "&Live panel", self._show_panel)
        a.setCheckable(True)
        a.setChecked(self.settings.show_panel)
        m.addSeparator()
        sizes = [
            ("&Larger text", 1, [QKeySequence.StandardKey.ZoomIn, "Ctrl+="]),  # = : + unshifted
            ("&Smaller text", -1, [QKeySequence.StandardKey.ZoomOut]),
            ("&Normal text size", 0, ["Ctrl+0"]),
        ]
        self.text_size_actions = []
        for text, way, keys in sizes:
            a = act(m, text, lambda _=False, way=way: self._text_size(way))
            a.setShortcuts([QKeySequence(k) for k in keys])
            self.text_size_actions.append(a)
        self._text_size_limits()
        m = self.menuBar().addMenu("&Help")
        act(m, "&Check this computer…", self.check_requested.emit)
        act(m, "Where are the &logs?", self._logs)

    def _wire(self) -> None:
        c = self.ctrl
        self.chat.send_requested.connect(self._send)
        self.chat.stop_requested.connect(c.stop)
        self.chat.regenerate_requested.connect(c.regenerate)
        self.chat.continue_requested.connect(c.continue_answer)
        self.chat.edit_requested.connect(c.edit_and_resend)
        self.chat.draft_changed.connect(c.save_draft)
        self.chat.edit_changed.connect(c.save_edit)
        self.chat_settings.changed.connect(lambda: c.update_settings(*self.chat_settings.values()))
        self.chat_settings.reset_requested.connect(self._default_sampling)
        self.list.clicked.connect(lambda idx: c.open(idx.data(IdRole)))
        self.list.picked.connect(lambda idx: c.open(idx.data(IdRole)))
        self.list.delete_requested.connect(self._delete)
        self.search.textChanged.connect(self._search)
        c.leaving.connect(self.chat.flush_draft)  # the last keystrokes, before the chat changes
        c.conversation_opened.connect(self._opened)
        c.busy_changed.connect(self.chat.set_busy)
        # idle once the answer ends, also one ended by a crash (no stats, no answer_finished)
        c.busy_changed.connect(lambda busy: busy or self.panel.set_rate(None))
        c.queue_note.connect(self.chat.set_queue_note)
        c.send_allowed.connect(self.chat.set_send_allowed)
        c.error.connect(self.show_error)
        c.status.connect(lambda text: self.statusBar().showMessage(text))
        c.context_changed.connect(self.chat.set_context)
        c.live_rate.connect(self.panel.set_rate)
        c.load_progress.connect(self.panel.set_progress)
        c.answer_finished.connect(self.panel.add_answer)
        c.reveal.connect(self.chat.reveal)
        c.answer_versions.connect(self.chat.set_versions)
        self.chat.version_requested.connect(c.show_answer_version)
        self.ctrl_wheel = CtrlWheel(self)  # Ctrl+wheel over any window: the text size
        self.ctrl_wheel.step.connect(self._text_size)
        QApplication.instance().installEventFilter(self.ctrl_wheel)

    def _search(self, query: str) -> None:
        self.ctrl.search(query)
        empty = bool(query.strip()) and self.ctrl.conversations.rowCount() == 0
        self.no_match.setText(f"No chat contains “{query.strip()}”." if empty else "")
        self.no_match.setVisible(empty)

    def _opened(self, cid: int) -> None:
        conv = self.ctrl.store.conversation(cid)
        self.chat_settings.load(conv.system_prompt, conv.sampling)
        self.chat.input.blockSignals(True)
        self.chat.input.setPlainText(conv.draft)
        self.chat.input.blockSignals(False)
        self.chat.set_context(0, 0, 0)
        row = self.ctrl.conversations.row_of(cid)
        if row >= 0:
            self.list.setCurrentIndex(self.ctrl.conversations.index(row))

    def _send(self, text: str) -> None:
        if self.ctrl.send(text):
            self.chat.sent()
            self.banner.setVisible(False)

    def show_error(self, message: str) -> None:
        self.banner.show_message(f"⚠ {message}", logs=self.log_dir)

    def set_dark(self, dark: bool) -> None:
        """Re-render messages (code colours) for a new light/dark theme."""
        self.chat.set_dark(dark)

    def on_engine_state(self, state: str, info: dict) -> None:
        self.panel.set_engine(state, info)
        loaded = state == "loaded"
        self.chat_settings.set_recommended(self.ctrl.recommended() if loaded else None)
        # a model came or went: the next chat starts from what it recommends
        if state in ("loaded", "ready") and self.ctrl.current is None and not self.ctrl.next_chat:
            self._show_next_chat_settings()
        self.unload_action.setEnabled(state == "loaded")
        if state == "crashed":
            self.crash = info.get("message") or "the engine stopped unexpectedly"
            self.show_error(f"{self.crash}. Restarting it; your conversation is kept.")
            self.statusBar().showMessage("The engine crashed; restarting it…")
        elif state == "failed":
            self.show_error(f"{info.get('message')}. Your conversation is kept; {RESTART_HINT}.")
            self.statusBar().showMessage("The engine is not running")
        elif state == "ready" and not self.ctrl.client.recovering:  # no model (a failed load)
            self.statusBar().showMessage("No model loaded")
        elif state == "loaded":  # the user's load and the reload after a restart alike
            model, n_ctx = model_label(info.get("model")), info.get("n_ctx")
            self.statusBar().showMessage(f"{model} ready: {n_ctx} tokens of context")
        recovered = state == "loaded" or (state == "ready" and not self.ctrl.client.recovering)
        if self.crash and (recovered or state == "failed"):
            self._restarted(state, info)

    def _restarted(self, state: str, info: dict) -> None:
        """The restart after a crash ended: its note (still shown) says how, where it said
        "Restarting it" for good."""
        crash, self.crash = self.crash, None
        if state == "failed" or not self.banner.isVisible():
            return  # a failed restart says so itself; a note closed stays closed
        if state == "loaded":
            again = f"It was restarted and {model_label(info.get('model'))} loaded again"
        else:
            again = "It was restarted (without a model: load one from the Model menu)"
        self.show_error(f"{crash}. {again}; your conversation is kept.")

    def _copy_last_answer(self) -> None:
        text = self.chat.last_answer_text()
        if text:
            QGuiApplication.clipboard().setText(text)
            self.statusBar().showMessage("Copied the last answer", 3000)

    def _poll(self) -> None:
        """Each second: the GPUs and the engine's memory, and the chat list's headings past
        midnight."""
        self.ctrl.conversations.new_day()
        self._spawn(self._poll_async(self.ctrl.client.pid))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _poll_async(self, pid: int | None) -> None:
        stats = {}
        if self.ctrl.client.state in ("ready", "loaded"):
            try:
                stats = await self.ctrl.client.stats(timeout=2)
            except Exception:  # a busy or restarting engine: try again next second
                stats = {}
        rss, vram = stats.get("rss_bytes"), stats.get("vram_reserved_bytes")
        self.panel.set_gpus(self.gpus.read(pid), self.gpus.error, rss, vram)

    # -- menu actions ------------------------------------------------------------------------------
    async def _unload(self) -> None:
        """Model > Unload model. Where NVML reports the engine's share of the GPUs, the status
        bar says what the unload gave back, as nvidia-smi sees it (the engine keeps its CUDA
        context until it quits)."""
        before = self._engine_gpu_bytes()
        if not await self.ctrl.unload_model() or before is None:
            return
        after = self._engine_gpu_bytes()
        if after is not None:
            self.statusBar().showMessage(
                f"Model unloaded: {gib(max(0, before - after))} of GPU memory given back "
                f"(NVML); the engine keeps {gib(after)} for CUDA itself"
            )

    def _engine_gpu_bytes(self) -> int | None:
        """The engine process's memory on all GPUs by NVML, or None where NVML does not say."""
        held = [g.engine_bytes for g in self.gpus.read(self.ctrl.client.pid)]
        known = [n for n in held if n is not None]
        return sum(known) if known else None

    def _rename(self) -> None:
        row = self.ctrl.conversations.row_of(self.ctrl.current or -1)
        if row >= 0:
            self.list.edit(self.ctrl.conversations.index(row))

    def _delete(self) -> None:
        cid = self.ctrl.current
        if cid is None:
            return
        title = self.ctrl.store.conversation(cid).title
        if (
            QMessageBox.question(self, "Delete chat", f"Delete “{title}”? This cannot be undone.")
            == QMessageBox.StandardButton.Yes
        ):
            self.ctrl.delete(cid)  # the open chat: none is open now
            self._show_next_chat_settings()

    def _export(self, kind: str) -> None:
        cid = self.ctrl.current
        if cid is None:
            return
        title = self.ctrl.store.conversation(cid).title
        suggested = str(self.file_dir / f"{file_name(title)}.{kind}")
        path, _ = QFileDialog.getSaveFileName(self, "Export chat", suggested)
        if not path:
            return
        if kind == "md":
            text = self.ctrl.store.export_markdown(cid)
        else:
            text = json.dumps(self.ctrl.store.export_json(cid), indent=2, ensure_ascii=False)
        try:
            Path(path).write_text(text, encoding="utf-8")
        except OSError as e:
            self.show_error(
                f"Could not export to {path}: {e.strerror or e}. Choose another folder."
            )
            return
        self.file_dir = Path(path).parent
        self.statusBar().showMessage(f"Exported to {path}")

    def _import(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Import chat", str(self.file_dir), "JSON (*.json)"
        )
        if path:
            self.import_file(Path(path))

    def import_file(self, path: Path) -> None:
        """Open a chat saved by Export chat as JSON; anything else is refused with the reason."""
        try:
            size = path.stat().st_size
            if size > MAX_IMPORT_BYTES:
                reason = f"at {size_text(size)} it is too large for a chat export"
            else:
                self.ctrl.import_json(json.loads(path.read_text(encoding="utf-8")), str(path))
                reason = ""
        except OSError as e:
            reason = e.strerror or str(e)
        except UnicodeDecodeError:
            reason = "it is not a text file"
        except json.JSONDecodeError as e:
            reason = f"it is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        except RecursionError:
            reason = "its JSON is nested too deeply"
        except StoreError as e:  # the store names the file itself
            reason = str(e).removeprefix(f"{path}: ")
        if not reason:
            self.file_dir = path.parent
            self.statusBar().showMessage(f"Imported {path}")
            return
        self.show_error(
            f"Could not import {path}: {reason}. Choose a file saved by File > Export chat as JSON."
        )

    def _load(self, path: str, context: int | None = None, device: str = "") -> None:
        self._spawn(self.ctrl.load_model(path, context, device or None))

    def _load_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a model folder")
        if path:
            self._load(path)

    def _logs(self) -> None:
        box = QMessageBox(
            QMessageBox.Icon.Information,
            "Logs",
            f"The app and engine logs are in:\n{self.log_dir}",
            QMessageBox.StandardButton.Close,
            self,
        )
        show = box.addButton("Open the folder", QMessageBox.ButtonRole.ActionRole)
        box.exec()
        if box.clickedButton() is show:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.log_dir)))
