"""The chat column: messages mirrored from MessageListModel, the composer, stop, context use."""

from __future__ import annotations

import itertools

from PySide6.QtCore import QEvent, QRegularExpression, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import (
    QColor,
    QDesktopServices,
    QFont,
    QGuiApplication,
    QKeyEvent,
    QKeySequence,
    QShortcut,
    QTextCursor,
    QTextDocument,
)
from PySide6.QtWidgets import (
    QBoxLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTextBrowser,
    QTextEdit,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..controller import can_continue
from .flow import FlowRow
from .markdown import COPY_SCHEME, code_blocks, plain_html, render
from .models import EditingRole, IdRole, MessageListModel, RoleRole, StatsRole, StatusRole

# A search's words in the message it found: text and background, readable in each theme
MATCH_LIGHT, MATCH_DARK = ("#000000", "#ffe27a"), ("#ffffff", "#7a5d00")
COPIED_MS = 1500  # how long a Copy button says "Copied ✓"
# The messages a chat opens with (its last ones); "Show earlier messages" adds as many again.
# Each message is a widget: a chat of 1000 took 3 s to open and its memory with it.
SHOWN = 100
REVEAL_MARGIN = 12  # px above a message a search found, at the top of the view
HEAD = 2  # the column's items before the messages: the Show earlier button, the empty hint


class Composer(QPlainTextEdit):
    """The message box: Enter sends (as in other chat apps), Shift+Enter starts a new line;
    Ctrl+Enter sends too. Tab goes on to the next control, as from a web page's text box (it
    typed a tab: the keyboard could not leave the box but by Ctrl+Tab)."""

    submitted = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.setTabChangesFocus(True)

    def keyPressEvent(self, e: QKeyEvent) -> None:
        if e.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            if e.modifiers() & Qt.KeyboardModifier.ShiftModifier:
                self.insertPlainText("\n")  # a new paragraph (Qt's own is a line separator)
            else:
                self.submitted.emit()
            e.accept()
            return
        super().keyPressEvent(e)


class MessageEditor(Composer):
    """A sent message edited in place: Enter sends it again, Shift+Enter starts a new line, Esc
    gives up the edit (not the answer being written, as Esc does elsewhere in the chat)."""

    cancelled = Signal()

    def event(self, e) -> bool:
        if e.type() == QEvent.Type.ShortcutOverride and e.key() == Qt.Key.Key_Escape:
            e.accept()  # the key comes here, before the chat's Esc shortcut (stop)
            return True
        return super().event(e)

    def keyPressEvent(self, e: QKeyEvent) -> None:
        if e.key() == Qt.Key.Key_Escape:
            self.cancelled.emit()
            e.accept()
            return
        super().keyPressEvent(e)


# Fewer new prompt tokens than this and their rate is mostly a step's fixed cost: a follow-up's
# 37 new tokens (the rest of the chat reused from the KV cache) in 205 ms read as a slow
# "180 tok/s" beside a first turn's 2000.
PROMPT_RATE_MIN = 128


_SPACE_PX: dict[str, float] = {}


def code_space_px(font: QFont) -> float:
    """A space's width in a code block (the fixed-pitch font Qt's rich text gives <pre>) of a
    message in ``font``: measured once a font, from a laid-out line."""
    key = font.key()
    if key not in _SPACE_PX:
        doc = QTextDocument()
        doc.setDefaultFont(font)
        doc.setHtml("<pre>" + " " * 10 + "x</pre>")
        doc.size()  # lays it out: a line not laid out has no place
        line = doc.begin().layout().lineAt(0)
        _SPACE_PX[key] = line.cursorToX(10)[0] / 10 if line.isValid() else 0.0
    return _SPACE_PX[key]


def count(n: int, noun: str) -> str:
    """ "1 token", "2 tokens": ``noun`` in the singular."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def prompt_part(stats: dict) -> str:
    """The prompt in an answer's stats: its reading speed where it had enough new tokens to
    measure one, else how many tokens it read. "" where the engine gave no prompt figures."""
    rate = stats.get("prefill_tok_s")
    if not rate:
        return ""
    cached = stats.get("cached_tokens", 0)
    new = stats.get("prompt_tokens", 0) - cached
    if "prompt_tokens" not in stats or new >= PROMPT_RATE_MIN:
        return f"prompt {rate:.0f} tok/s"
    return f"prompt {count(new, 'new token')}" if cached else f"prompt {count(new, 'token')}"


MODEL_NAME_MOST = 40  # characters of the model's name an answer's line shows


def model_name(model: str) -> str:
    """The answering model as an answer's line names it: a repo's or a folder's own name (not
    its owner or path), at most MODEL_NAME_MOST characters."""
    name = model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or model
    return name if len(name) <= MODEL_NAME_MOST else name[: MODEL_NAME_MOST - 1] + "…"


def stats_line(stats: dict, status: str) -> str:
    parts = []
    if stats.get("completion_tokens"):
        parts.append(count(stats["completion_tokens"], "token"))
    if stats.get("decode_tok_s"):
        parts.append(f"{stats['decode_tok_s']:.1f} tok/s")
    if stats.get("ttft_s"):
        parts.append(f"first token {stats['ttft_s'] * 1000:.0f} ms")
    if prompt := prompt_part(stats):
        parts.append(prompt)
    if stats.get("model"):  # which model wrote it (the chat may have had others)
        parts.append(model_name(stats["model"]))
    if status == "stopped":
        parts.append("stopped")
    if status == "error":  # the text is what came before it (the banner says what happened)
        parts.append("ended by an error")
    if stats.get("truncated"):
        parts.append("cut at the token limit")
    if status == "streaming":  # sent during a load: the answer starts once the model is there
        parts.append("waiting for the model to load…" if stats.get("waiting") else "writing…")
    # each part whole on a line: "369 tok/s" broke after "/" or before "tok" in a narrow window
    return " · ".join(p.replace(" ", "\u00a0").replace("/", "/\u2060") for p in parts)


class MessageWidget(QFrame):
    copy_requested = Signal(str)
    edit_submitted = Signal(str)  # the message as edited in place, to send again
    edit_changed = Signal(object)  # the edit in progress's text; None: it ended (not sent)
    regenerate_requested = Signal()
    continue_requested = Signal()
    version_requested = Signal(int)  # -1: the answer before this one, +1: the one after

    def __init__(self, role: str, dark: bool):
        super().__init__()
        self.role, self.dark, self.text = role, dark, ""
        self.id: int | None = None  # the message's in the history (ChatView._make)
        self.copied: int | None = None  # the code block whose Copy link says "Copied ✓" now
        self.code: list[str] = []  # the text's fenced code blocks, found where it is drawn
        self.can_continue = False  # stopped, cut at the token limit or by an error
        self.setObjectName("userMessage" if role == "user" else "assistantMessage")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.who = QLabel("You" if role == "user" else "Assistant")
        self.who.setStyleSheet("font-weight: bold;")
        self.meta = QLabel()
        self.meta.setObjectName("messageStats")
        self.meta.setWordWrap(True)
        self.meta.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.body = QTextBrowser()
        self.body.setOpenLinks(False)  # _link: a code block's Copy, or a web page
        self.body.anchorClicked.connect(self._link)
        self.body.setFrameShape(QFrame.Shape.NoFrame)
        self.body.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.body.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.body.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.body.setAccessibleName(f"{self.who.text()} message")
        self.body.document().documentLayout().documentSizeChanged.connect(self._fit)
        self.copy = self._button("Copy", "Copy this message", self._copy)
        self.copy_code = self._button("Copy code", "Copy the code blocks", self._copy_code)
        self.edit = self._button("Edit", "Edit this message and send it again", self.start_edit)
        self.regen = self._button("Regenerate", "Answer again", self.regenerate_requested.emit)
        self.more = self._button(
            "Continue", "Write more of this answer", self.continue_requested.emit
        )
        # the last answer's versions (Regenerate keeps the answers it replaces): ‹ 2/3 ›
        self.older = self._button(
            "‹", "Show the answer before this one", lambda: self.version_requested.emit(-1)
        )
        self.newer = self._button(
            "›", "Show the answer after this one", lambda: self.version_requested.emit(1)
        )
        self.which = QLabel(objectName="messageStats")
        self.which.setAccessibleName("Answer version")
        self.edit.setVisible(role == "user")
        self.regen.setVisible(False)
        self.more.setVisible(False)
        self.set_versions(1, 1)
        # who wrote it (and which version) on the left, the buttons on the right; where the
        # message is narrower than both (large text, a small window) the buttons go on a row
        # of their own (they had widened the message past the chat's edge, which cut it off),
        # and on more rows where one does not hold them
        self.name_row, self.button_row = QHBoxLayout(), FlowRow()
        for w in (self.who, self.older, self.which, self.newer):
            self.name_row.addWidget(w)
        self.name_row.addStretch(1)
        for b in (self.copy_code, self.copy, self.edit, self.more, self.regen):
            self.button_row.addWidget(b)
        # what Tab goes through here (it passes over hidden ones): the version arrows, the
        # buttons as they stand, the text (or the edit box: start_edit)
        self.tab_order = [self.older, self.newer, self.copy_code, self.copy, self.edit, self.more,
                          self.regen, self.body]  # fmt: skip
        self.head = QBoxLayout(QBoxLayout.Direction.LeftToRight)
        self.head.addLayout(self.name_row, 1)
        self.head.addLayout(self.button_row)
        self.setMinimumWidth(1)  # the head's width does not hold the message wider: fit_head
        lay = QVBoxLayout(self)
        lay.setContentsMargins(10, 6, 10, 6)
        lay.setSpacing(2)
        lay.addLayout(self.head)
        lay.addWidget(self.meta)
        lay.addWidget(self.body)
        self.editor: MessageEditor | None = None  # made on the first Edit

    def _button(self, text: str, tip: str, slot) -> QToolButton:
        b = QToolButton()
        b.setText(text)
        b.setToolTip(tip)
        b.setAccessibleName(tip)
        b.setAutoRaise(True)
        b.clicked.connect(lambda: slot())  # without clicked's bool (start_edit takes a text)
        return b

    def set_content(self, text: str, status: str, stats: dict) -> None:
        if text != self.text or not self.body.toPlainText():
            self.text = text
            self._render()
        self.copy_code.setVisible(bool(self.code) and not self.editing())
        self.can_continue = can_continue(self.role, status, stats, text)
        line = stats_line(stats, status)
        self.meta.setText(line)
        self.meta.setVisible(bool(line))

    def set_versions(self, at: int, count: int) -> None:
        """Which of ``count`` answers to its question this is (1-based); none shown for one."""
        for w in (self.older, self.which, self.newer):
            w.setVisible(count > 1)
        self.which.setText(f"{at}/{count}")
        self.which.setAccessibleDescription(f"answer {at} of {count}")
        self.older.setEnabled(at > 1)
        self.newer.setEnabled(at < count)

    def set_dark(self, dark: bool) -> None:
        """Drawn again in the new theme's code colours, in place (an edit in progress stays)."""
        self.dark = dark
        self._render()

    def changeEvent(self, e) -> None:
        super().changeEvent(e)
        if e.type() == QEvent.Type.FontChange and self.role != "user":  # a new text size: code
            self._render()  # lines hang by its spaces (a user's text is plain)

    def _render(self) -> None:
        if self.role == "user":
            self.body.setHtml(plain_html(self.text))
            self.code = code_blocks(self.text)
        else:
            # the message's font: on a new text size its body may not have taken it yet
            space = code_space_px(self.font())
            page, self.code = render(self.text, self.dark, space, self.copied)
            self.body.setHtml(page)

    def _link(self, url: QUrl) -> None:
        """A code block's Copy link copies that block; a web address opens in the browser."""
        if url.scheme() != COPY_SCHEME:
            QDesktopServices.openUrl(url)
            return
        n = int(url.path())  # the links and the blocks come from the same text: it is there
        QGuiApplication.clipboard().setText(self.code[n])
        self.copied = n
        self._render()

        def done() -> None:
            if self.copied == n:
                self.copied = None
                self._render()

        QTimer.singleShot(COPIED_MS, self, done)

    def mark(self, words: list[str]) -> None:
        """Mark the words the search matched in the message: each word that starts with one of
        ``words``, in any case, as the search's prefix match found them."""
        doc, found = self.body.document(), []
        fg, bg = MATCH_DARK if self.dark else MATCH_LIGHT
        for word in words:
            pattern = QRegularExpression(
                r"\b" + QRegularExpression.escape(word) + r"\w*",
                QRegularExpression.PatternOption.CaseInsensitiveOption
                | QRegularExpression.PatternOption.UseUnicodePropertiesOption,  # é is a letter
            )
            cursor = doc.find(pattern)
            while not cursor.isNull():
                sel = QTextEdit.ExtraSelection()
                sel.cursor = cursor
                sel.format.setBackground(QColor(bg))
                sel.format.setForeground(QColor(fg))
                found.append(sel)
                cursor = doc.find(pattern, cursor)
        self.body.setExtraSelections(found)

    def _fit(self) -> None:
        self.body.setFixedHeight(int(self.body.document().size().height()) + 4)

    def fit_head(self) -> None:
        """The buttons beside the name where the message is wide enough for both, else under
        it (called on a resize and when buttons are shown or hidden)."""
        margins = self.layout().contentsMargins()
        room = self.width() - margins.left() - margins.right()
        for row in (self.name_row, self.button_row):
            row.invalidate()  # a button just shown or hidden: its size is not cached yet
        need = (
            self.name_row.minimumSize().width()
            + self.head.spacing()
            + self.button_row.sizeHint().width()
        )
        wide = QBoxLayout.Direction.LeftToRight
        direction = wide if room >= need else QBoxLayout.Direction.TopToBottom
        if self.head.direction() != direction:
            self.head.setDirection(direction)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self.fit_head()
        width = self.body.viewport().width()
        if width != self.body.document().textWidth():
            self.body.document().setTextWidth(width)
            self._fit()

    # -- editing in place -------------------------------------------------------------------------
    def start_edit(self, text: str | None = None) -> None:
        """The message becomes a text box holding it (or ``text``: an edit begun before), with
        Send and Cancel under it (a small dialog without word wrap showed a line of it at a
        time)."""
        if self.editor is None:
            self.editor = MessageEditor()
            self.editor.setAccessibleName("Edited message")
            self.editor.submitted.connect(self._submit_edit)
            self.editor.cancelled.connect(self.end_edit)
            self.editor.textChanged.connect(
                lambda: self.edit_changed.emit(self.editor.toPlainText())
            )
            # its height follows the text's lines, as typing or a new width wraps them
            self.editor.document().documentLayout().documentSizeChanged.connect(self._fit_editor)
            self.edit_send = QPushButton("Send")
            self.edit_send.setAccessibleName("Send the edited message")
            self.edit_send.clicked.connect(self._submit_edit)
            self.edit_cancel = QPushButton("Cancel")
            self.edit_cancel.setAccessibleName("Cancel the edit")
            self.edit_cancel.clicked.connect(self.end_edit)
            row = QHBoxLayout()
            note = QLabel("Send replaces the messages after it.", wordWrap=True)
            note.setObjectName("messageStats")
            row.addWidget(note, 1)
            row.addWidget(self.edit_cancel)
            row.addWidget(self.edit_send)
            self.edit_box = QWidget()
            box = QVBoxLayout(self.edit_box)
            box.setContentsMargins(0, 4, 0, 0)
            box.addWidget(self.editor)
            box.addLayout(row)
            self.layout().addWidget(self.edit_box)
            # Tab: from the editor to Cancel and Send, then on to the next message (they came
            # last in the window's chain, as new widgets do)
            self.tab_order += [self.editor, self.edit_cancel, self.edit_send]
            for before, after in itertools.pairwise(self.tab_order[-4:]):
                QWidget.setTabOrder(before, after)
        self.editor.setPlainText(self.text if text is None else text)
        self.editor.moveCursor(QTextCursor.MoveOperation.End)
        for w in (self.body, self.edit, self.copy, self.copy_code):
            w.hide()
        self.edit_box.show()
        self.editor.setFocus()  # typed into at once (not where the chat is rebuilt, hidden)

    def editing(self) -> bool:
        return self.editor is not None and self.edit_box.isVisibleTo(self)

    def end_edit(self) -> None:
        """Back to the message as sent."""
        if not self.editing():
            return
        self.edit_box.hide()
        for w in (self.body, self.edit, self.copy):
            w.show()
        self.copy_code.setVisible(bool(self.code))
        self.edit_changed.emit(None)

    def set_edit_allowed(self, allowed: bool) -> None:
        """Edit and the editor's Send follow whether the chat takes a message now."""
        self.edit.setEnabled(allowed)
        if self.editor is not None:
            self.edit_send.setEnabled(allowed)

    def _submit_edit(self) -> None:
        text = self.editor.toPlainText()
        if text.strip() and self.edit_send.isEnabled():
            self.edit_submitted.emit(text)

    def _fit_editor(self, *_) -> None:
        """As tall as its text, from three lines to twelve (then it scrolls)."""
        e = self.editor
        lines = e.document().documentLayout().documentSize().height()
        spacing = e.fontMetrics().lineSpacing()
        margins = 2 * (e.document().documentMargin() + e.frameWidth()) + 1
        e.setFixedHeight(int(min(max(lines, 3), 12) * spacing + margins))

    def _copy(self) -> None:
        QGuiApplication.clipboard().setText(self.text)
        self.copy_requested.emit(self.text)
        self._copied(self.copy, "Copy")

    def _copy_code(self) -> None:
        QGuiApplication.clipboard().setText("\n\n".join(self.code))
        self._copied(self.copy_code, "Copy code")

    def _copied(self, button: QToolButton, text: str) -> None:
        """The button says "Copied ✓" for a moment: a copy had shown nothing at all."""
        button.setText("Copied ✓")
        button.setMinimumWidth(button.sizeHint().width())  # and keeps it: the row does not jump
        # with the button as context: a message deleted meanwhile (another chat opened) is fine
        QTimer.singleShot(COPIED_MS, button, lambda: button.setText(text))


class ChatView(QWidget):
    send_requested = Signal(str)
    stop_requested = Signal()
    regenerate_requested = Signal()
    continue_requested = Signal()
    edit_requested = Signal(int, str)  # row, new text
    version_requested = Signal(int)  # the last answer's version before (-1) or after (+1)
    # what the last answer offers now: Regenerate, Continue, the versions before and after it
    answer_actions = Signal(bool, bool, bool, bool)
    draft_changed = Signal(str)
    edit_changed = Signal(int, object)  # a message's edit in progress: id, text (None: ended)

    def __init__(self, model: MessageListModel, dark: bool = False):
        super().__init__()
        self.model, self.dark = model, dark
        self.widgets: list[MessageWidget] = []
        self.versions = (1, 1)  # the last answer's: which, of how many (set_versions)
        self.column = QVBoxLayout()
        self.column.addStretch(1)
        inner = QWidget()
        inner.setLayout(self.column)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(inner)
        self.scroll.setAccessibleName("Conversation")
        # the view keeps to the end of the chat (where the answer is written) until the user
        # scrolls away from it, and again once they scroll back down
        self.pinned = True
        self.scroll.verticalScrollBar().rangeChanged.connect(self._follow)
        self.scroll.verticalScrollBar().actionTriggered.connect(self._user_scrolled)
        # over the view's bottom right corner while it is scrolled away from the chat's end
        self.to_end = QToolButton(self.scroll.viewport(), text="↓ Latest", visible=False)
        self.to_end.setToolTip("Go to the end of the chat (and follow the answer there)")
        self.to_end.setAccessibleName("Go to the end of the chat")
        self.to_end.clicked.connect(self.show_end)
        self.scroll.viewport().installEventFilter(self)
        for changed in (
            self.scroll.verticalScrollBar().valueChanged,
            self.scroll.verticalScrollBar().rangeChanged,
        ):
            changed.connect(self._place_to_end)
        for asked in (self.regenerate_requested, self.continue_requested, self.edit_requested):
            asked.connect(self.show_end)  # before the controller's slots: the answer is followed
        self.empty = QLabel("Start a conversation: type below and press Enter.")
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty.setWordWrap(True)  # a narrow window wraps the hint instead of cutting it
        self.empty.setObjectName("emptyHint")
        self.column.insertWidget(0, self.empty)
        self.first = 0  # the row of widgets[0]: the rows before it are not shown (yet)
        self.anchor: tuple[MessageWidget, int] | None = None  # kept in place: widget, its y
        self.earlier = QPushButton(visible=False)
        self.earlier.setAccessibleName("Show earlier messages")
        self.earlier.clicked.connect(self.show_earlier)
        self.column.insertWidget(0, self.earlier, 0, Qt.AlignmentFlag.AlignHCenter)
        self.context = QLabel()
        self.context.setAccessibleName("Context use")
        # wrapped: on one line it widened the window (780 px to 1019) when it appeared
        self.dropped = QLabel(wordWrap=True)
        self.dropped.setObjectName("warning")
        self.dropped.setVisible(False)
        # while the engine writes an answer in another chat: where, and what a message sent
        # here does (waits its turn)
        self.queue_note = QLabel(wordWrap=True, visible=False, objectName="emptyHint")
        self.queue_note.setAccessibleName("Answer in another chat")
        self.input = Composer()
        self.input.setPlaceholderText(
            "Message the model (Enter sends, Shift+Enter: new line, Esc stops)"
        )
        self.input.submitted.connect(self._send)
        self.input.setAccessibleName("Message")
        self.input.textChanged.connect(self._fit_input)
        self.draft_timer = QTimer(self, singleShot=True, interval=300)
        self.draft_timer.timeout.connect(lambda: self.draft_changed.emit(self.input.toPlainText()))
        self.input.textChanged.connect(self.draft_timer.start)
        # edits in progress of messages, saved as the draft is: id -> text (None: ended)
        self.edits: dict[int, str | None] = {}
        self.edit_timer = QTimer(self, singleShot=True, interval=300)
        self.edit_timer.timeout.connect(self._save_edits)
        self.send_button = QPushButton("Send")
        self.send_button.setAccessibleName("Send message")
        self.send_button.clicked.connect(self._send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setAccessibleName("Stop the answer")
        self.stop_button.clicked.connect(self.stop_requested.emit)
        self.stop_button.setEnabled(False)
        QShortcut(QKeySequence("Escape"), self, self.stop_requested.emit)
        buttons = QVBoxLayout()
        buttons.addStretch(1)  # together at the bottom beside a tall composer
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        composer = QHBoxLayout()
        composer.addWidget(self.input, 1)
        composer.addLayout(buttons)
        footer = QHBoxLayout()
        footer.addWidget(self.context)
        footer.addWidget(self.dropped, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.scroll, 1)
        lay.addLayout(footer)
        lay.addWidget(self.queue_note)
        lay.addLayout(composer)
        self._fit_input()
        model.modelReset.connect(lambda: self._rebuild())
        model.rowsInserted.connect(self._inserted)
        model.rowsRemoved.connect(self._removed)
        model.dataChanged.connect(self._changed)
        self._rebuild()

    # -- model mirroring -----------------------------------------------------------------------
    def _make(self, row: int) -> MessageWidget:
        idx = self.model.index(row)
        w = MessageWidget(idx.data(RoleRole), self.dark)
        w.id = idx.data(IdRole)
        w.edit_submitted.connect(lambda text, w=w: self._edit(w, text))
        w.regenerate_requested.connect(self.regenerate_requested.emit)
        w.continue_requested.connect(self.continue_requested.emit)
        w.version_requested.connect(self.version_requested.emit)
        w.set_content(idx.data(), idx.data(StatusRole), idx.data(StatsRole) or {})
        if (edited := idx.data(EditingRole)) is not None:
            w.start_edit(edited)  # as it was left when its chat was closed (or the app quit)
        w.edit_changed.connect(lambda text, mid=w.id: self._edit_changed(mid, text))
        return w

    def _edit_changed(self, mid: int, text: str | None) -> None:
        self.edits[mid] = text
        self.edit_timer.start()

    def _save_edits(self) -> None:
        edits, self.edits = self.edits, {}  # (the timer, if it runs still, finds none)
        for mid, text in edits.items():
            self.edit_changed.emit(mid, text)

    def _rebuild(self, shown: int = SHOWN) -> None:
        """A chat opened: its last ``shown`` messages, from the end."""
        # Hidden while it fills, the column is laid out once: shown, it was laid out again for
        # every message added (a chat of 400 messages opened in 29 s, now 1 s).
        inner = self.scroll.widget()
        inner.hide()
        self._save_edits()  # the chat's (saved already where `leaving` came first)
        for w in self.widgets:
            w.deleteLater()
        self.widgets, self.anchor = [], None
        self.first = max(0, self.model.rowCount() - shown)
        self._add(self.first, self.model.rowCount() - 1)
        self.pinned = True  # it opened at the top, or where the last chat was scrolled to
        inner.show()
        self.refresh_buttons()

    def show_earlier(self) -> None:
        """Show up to SHOWN more of the chat's earlier messages, keeping the view where it is."""
        if not self.first:
            return
        top = self.widgets[0] if self.widgets else None
        bar = self.scroll.verticalScrollBar()
        inner = self.scroll.widget()
        inner.hide()
        before, self.first = self.first, max(0, self.first - SHOWN)
        self._add(self.first, before - 1)
        if top is not None:  # _follow keeps it where it was in the view
            self.anchor = (top, top.y() - bar.value())
            self.pinned = False
        inner.show()
        self.refresh_buttons()

    def _add(self, first: int, last: int) -> None:
        """Widgets for the model's rows first..last (all at or after self.first)."""
        for row in range(first, last + 1):
            w = self._make(row)
            self.widgets.insert(row - self.first, w)
            self.column.insertWidget(HEAD + row - self.first, w)
        self._order_focus()

    def _order_focus(self) -> None:
        """Tab goes through the messages' buttons and texts in their order, between the chat's
        view and the composer (a new message's went to the end of the window's chain, after the
        live panel). Qt orders only widgets that take focus, each message's one by one."""
        before = self.earlier  # (the composer comes after it in the chain, and so after these)
        for w in self.widgets:
            for control in w.tab_order:
                QWidget.setTabOrder(before, control)
                before = control

    def _inserted(self, parent, first: int, last: int) -> None:
        if first < self.first:  # before those shown (the app adds rows at the end)
            self.first += last - first + 1
        else:
            self._add(first, last)
        self.refresh_buttons()

    def _removed(self, parent, first: int, last: int) -> None:
        lo, hi = max(first, self.first) - self.first, max(0, last + 1 - self.first)
        for w in self.widgets[lo:hi]:
            w.deleteLater()
        del self.widgets[lo:hi]
        self.first -= max(0, min(last + 1, self.first) - first)  # rows before it gone
        self.refresh_buttons()

    def _changed(self, top_left, bottom_right, roles=()) -> None:
        for row in range(max(top_left.row(), self.first), bottom_right.row() + 1):
            idx = self.model.index(row)
            self.widgets[row - self.first].set_content(
                idx.data(), idx.data(StatusRole), idx.data(StatsRole) or {}
            )
        self.refresh_buttons()

    def refresh_buttons(self) -> None:
        """Edit, Regenerate and Continue while this chat takes a message (they wait their turn
        behind an answer in another chat, as Send does)."""
        self.empty.setVisible(not self.model.rowCount())
        self.earlier.setVisible(self.first > 0)
        if self.first:
            more = min(SHOWN, self.first)
            self.earlier.setText(
                f"Show {more} earlier message{'s' if more > 1 else ''} (of {self.first})"
            )
        free = self.send_button.isEnabled()
        for i, w in enumerate(self.widgets):
            last_answer = i == len(self.widgets) - 1 and w.role == "assistant" and free
            w.regen.setVisible(last_answer)
            w.more.setVisible(last_answer and w.can_continue)
            w.set_versions(*(self.versions if last_answer else (1, 1)))
            w.set_edit_allowed(free)
        for w in self.widgets[-2:]:  # the buttons shown change on the last answer alone (and
            w.fit_head()  # on the one before it when a message comes): not each repaint's 100
        last = self.widgets[-1] if self.widgets else None
        offers = last is not None and last.role == "assistant" and free
        at, count = self.versions
        self.answer_actions.emit(
            offers, offers and last.can_continue, offers and at > 1, offers and at < count
        )

    # -- composer --------------------------------------------------------------------------------
    def _fit_input(self) -> None:
        """The composer as tall as its text: from the Send and Stop buttons' height up to 40% of
        the view (then it scrolls). A fixed 120 px took half the transcript's room in a small
        window, for a message of one line. Empty, as tall as its hint's wrapped lines (in a
        narrow chat or at a large text size they were cut off)."""
        lines = self.input.document().documentLayout().documentSize().height()  # visual lines
        if not self.input.toPlainText():
            width = self.input.viewport().width() - 2 * self.input.document().documentMargin()
            hint = self.input.fontMetrics().boundingRect(
                0, 0, max(1, int(width)), 10**6, Qt.TextFlag.TextWordWrap,
                self.input.placeholderText(),
            )  # fmt: skip
            lines = hint.height() / self.input.fontMetrics().lineSpacing()
        text = (
            max(lines, 1) * self.input.fontMetrics().lineSpacing()
            + 2 * (self.input.document().documentMargin() + self.input.frameWidth())
            + 1
        )
        least = self.send_button.sizeHint().height() * 2 + 6  # the two buttons beside it
        most = max(least, int(self.height() * 0.4))
        self.input.setFixedHeight(int(min(max(text, least), most)))

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit_input()  # the limit follows the view; wrapped lines follow the width

    def _send(self) -> None:
        text = self.input.toPlainText()
        if text.strip() and self.send_button.isEnabled():
            self.send_requested.emit(text)

    def set_dark(self, dark: bool) -> None:
        """Every message drawn again for a new theme (code colours differ), where it is: the
        chat was built again, which lost an edit in progress and the place read to."""
        self.dark = dark
        for w in self.widgets:
            w.set_dark(dark)

    def flush_draft(self) -> None:
        """Save a draft and edits whose debounce timer has not fired yet (before quitting or
        opening another chat, whose rows are read from the history then)."""
        if self.draft_timer.isActive():
            self.draft_timer.stop()
            self.draft_changed.emit(self.input.toPlainText())
        self._save_edits()

    def sent(self) -> None:
        """The controller took the message: clear the composer, and follow its answer."""
        self.input.clear()
        self.show_end()

    def show_end(self, *_) -> None:
        """Show the chat's end and keep to it (an answer asked for is written there)."""
        self.pinned, self.anchor = True, None
        bar = self.scroll.verticalScrollBar()
        bar.setValue(bar.maximum())

    def set_busy(self, busy: bool) -> None:
        """The engine is writing an answer (in this chat or another): Stop ends it. (What this
        chat may send, edit or regenerate follows set_send_allowed.)"""
        self.stop_button.setEnabled(busy)

    def set_send_allowed(self, allowed: bool) -> None:
        self.send_button.setEnabled(allowed)
        self.refresh_buttons()

    def set_queue_note(self, text: str) -> None:
        """The line above the composer about answers in other chats ("" hides it)."""
        self.queue_note.setText(text)
        self.queue_note.setVisible(bool(text))

    def last_answer_text(self) -> str:
        """The chat's last answer as written ("" where it has none yet)."""
        answers = [w for w in self.widgets if w.role == "assistant"]
        return answers[-1].text if answers else ""

    def set_versions(self, at: int, count: int) -> None:
        """The last answer is answer ``at`` of ``count`` to its question."""
        self.versions = (at, count)
        self.refresh_buttons()

    def _edit(self, w: MessageWidget, text: str) -> None:
        self.edit_requested.emit(self.first + self.widgets.index(w), text)

    def keep_place(self) -> None:
        """The message at the top of a view scrolled up to read stays there through the
        relayout that comes next (a new text size): the view kept its offset in pixels, and
        with the text's new height showed another part of the chat. (A view at the chat's end
        keeps to it: _follow looks at that first.)"""
        value = self.scroll.verticalScrollBar().value()
        top = next((w for w in self.widgets if w.y() + w.height() > value), None)
        if top is not None:
            self.anchor = (top, top.y() - value)  # _follow keeps it there

    def reveal(self, row: int, words: list[str]) -> None:
        """Message ``row`` near the top of the view (the earlier messages before it shown as
        needed), with ``words`` marked: a chat opened from a search."""
        while row < self.first:
            self.show_earlier()
        w = self.widgets[row - self.first]
        w.mark(words)
        self.pinned, self.anchor = False, (w, REVEAL_MARGIN)  # _follow keeps it there
        self.scroll.verticalScrollBar().setValue(w.y() - REVEAL_MARGIN)

    def set_context(self, used: int, n_ctx: int, dropped: int) -> None:
        self.context.setText(f"Context: {used} / {n_ctx} tokens" if n_ctx else "")
        self.dropped.setVisible(dropped > 0)
        if dropped == 1:
            text = (
                "⚠ The oldest message no longer fits the context and was left out of this answer."
            )
        elif dropped:
            text = (
                f"⚠ The {dropped} oldest messages no longer fit the context and "
                "were left out of this answer."
            )
        else:
            text = ""
        self.dropped.setText(text)

    def eventFilter(self, watched, event) -> bool:
        if watched is self.scroll.viewport() and event.type() == QEvent.Type.Resize:
            self._place_to_end()
        return super().eventFilter(watched, event)

    def _place_to_end(self, *_) -> None:
        """ "↓ Latest" shows where the chat goes on below the view (scrolled up to read)."""
        bar, view, b = self.scroll.verticalScrollBar(), self.scroll.viewport(), self.to_end
        b.setVisible(bar.value() < bar.maximum() - 40)
        b.adjustSize()
        b.move(view.width() - b.width() - 12, view.height() - b.height() - 10)
        b.raise_()

    def _user_scrolled(self, _action: int) -> None:
        bar = self.scroll.verticalScrollBar()
        self.pinned = bar.sliderPosition() >= bar.maximum() - 40  # the position it moves to
        self.anchor = None

    def _follow(self, _min: int, maximum: int) -> None:
        """The chat grew (an answer streams, a message came, earlier ones were shown) or the
        view changed size."""
        bar = self.scroll.verticalScrollBar()
        if self.pinned:
            bar.setValue(maximum)
        elif self.anchor is not None and self.anchor[0] in self.widgets:
            widget, y = self.anchor  # the message at the top before earlier ones came
            bar.setValue(widget.y() - y)
