"""Qt list models over the store's conversations and messages. They emit dataChanged for the
exact rows that change (a streamed answer touches one row, never the whole list)."""

from __future__ import annotations

import calendar
import functools
import time
from collections.abc import Callable
from datetime import date
from typing import Any

from PySide6.QtCore import QAbstractListModel, QModelIndex, QPersistentModelIndex, Qt

from ..store import MATCH_CLOSE, MATCH_OPEN, Conversation, Message

Index = QModelIndex | QPersistentModelIndex
IdRole = Qt.ItemDataRole.UserRole + 1
RoleRole = Qt.ItemDataRole.UserRole + 2
StatusRole = Qt.ItemDataRole.UserRole + 3
StatsRole = Qt.ItemDataRole.UserRole + 4
SnippetRole = Qt.ItemDataRole.UserRole + 5
GroupRole = Qt.ItemDataRole.UserRole + 6  # the heading above a chat that starts a time group
EditingRole = Qt.ItemDataRole.UserRole + 7  # a message's edit in progress (None: none)
ANSWERING_MARK = "● "  # before the title of the chat an answer is being written in
WAITING_MARK = "○ "  # before the titles of chats whose message waits for an answer


def day_group(updated: float, now: float) -> str:
    """The part of the chat list a chat last active at ``updated`` falls in, as chat apps group
    them: Today, Yesterday, Previous 7 days, Previous 30 days, then its month ("October 2026").
    Days are the computer's local calendar days."""
    return _group_of_day(date.fromtimestamp(updated), date.fromtimestamp(now))


@functools.lru_cache(maxsize=1024)
def _group_of_day(when: date, today: date) -> str:
    """day_group's, once a day (a month's name is formatted anew at each call: 3000 chats took
    20 ms a change of the list)."""
    days = (today - when).days
    if days <= 0:  # (a clock set back: today)
        return "Today"
    if days == 1:
        return "Yesterday"
    if days < 7:
        return "Previous 7 days"
    if days < 30:
        return "Previous 30 days"
    return f"{calendar.month_name[when.month]} {when.year}"


class ConversationListModel(QAbstractListModel):
    """The sidebar: conversations, newest first; editable titles (rename in place)."""

    def __init__(self, rename: Callable[[int, str], None] | None = None):
        super().__init__()
        self.rows: list[Conversation] = []
        self.snippets: dict[int, str] = {}
        self.rename = rename
        self.answering: int | None = None  # the chat an answer is being written in
        self.waiting: set[int] = set()  # chats whose message waits for an answer
        self.clock: Callable[[], float] = time.time  # "now" for the time groups (tests set it)
        self.headings: list[str] | None = None  # _headings, until the rows change
        self.groups: list[str] = []  # each row's time group (_headings)
        self.day = date.today()  # the day the headings were worked out on

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.rows)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self.rows):
            return None
        c = self.rows[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return self._mark(c.id) + c.title
        if role == Qt.ItemDataRole.EditRole:
            return c.title
        if role == Qt.ItemDataRole.ToolTipRole:
            tip = c.title  # and during a search the snippet the list shows, whole
            if snippet := self.snippets.get(c.id):
                tip += "\n" + snippet.replace(MATCH_OPEN, "").replace(MATCH_CLOSE, "")
            if c.id == self.answering:
                return f"{tip}\n(the model is answering in this chat)"
            return f"{tip}\n(a message here waits for an answer)" if c.id in self.waiting else tip
        if role == IdRole:
            return c.id
        if role == SnippetRole:
            return self.snippets.get(c.id, "")
        if role == GroupRole:
            return self._headings()[index.row()]
        if role == Qt.ItemDataRole.AccessibleDescriptionRole:  # a screen reader's heading
            self._headings()  # (it works the groups out too)
            return self.groups[index.row()] or None  # none during a search
        return None

    def _headings(self) -> list[str]:
        """Each row's time-group heading, "" within a group (newest first: a heading where the
        group changes); none for a search's results, in the order of their match. Worked out
        once for the rows as they are (the list asks for every row's at each layout), with each
        row's group (``groups``)."""
        if self.headings is None:
            before, self.day = "", date.fromtimestamp(self.clock())
            self.groups = [
                "" if self.snippets else _group_of_day(date.fromtimestamp(c.updated), self.day)
                for c in self.rows
            ]
            self.headings = []
            for group in self.groups:
                self.headings.append(group if group != before else "")
                before = group
        return self.headings

    def extra_lines(self, row: int) -> tuple[bool, bool]:
        """Whether the row has a heading above its title and a snippet under it, for the list's
        row heights (asked for every row at each layout: without data()'s two calls through Qt
        a layout of 3000 chats took a third of the time)."""
        return bool(self._headings()[row]), bool(self.snippets.get(self.rows[row].id))

    def new_day(self) -> None:
        """Past midnight since the headings were worked out (an app left open): today's chats
        are yesterday's now, and the list lays out its headings again."""
        if self.headings is not None and date.fromtimestamp(self.clock()) != self.day:
            self.layoutAboutToBeChanged.emit()
            self.headings = None
            self.layoutChanged.emit()

    def flags(self, index: Index) -> Qt.ItemFlag:
        base = super().flags(index)
        return base | Qt.ItemFlag.ItemIsEditable if index.isValid() else base

    def setData(self, index: Index, value: Any, role: int = Qt.ItemDataRole.EditRole) -> bool:
        title = str(value).strip()
        if role != Qt.ItemDataRole.EditRole or not index.isValid() or not title:
            return False
        c = self.rows[index.row()]
        c.title = title
        if self.rename:
            self.rename(c.id, title)
        self.dataChanged.emit(index, index, [Qt.ItemDataRole.DisplayRole])
        return True

    def set_rows(self, rows: list[Conversation], snippets: dict[int, str] | None = None) -> None:
        self.beginResetModel()
        self.rows = list(rows)
        self.snippets = snippets or {}
        self.headings = None
        self.endResetModel()

    def _mark(self, cid: int) -> str:
        if cid == self.answering:
            return ANSWERING_MARK
        return WAITING_MARK if cid in self.waiting else ""

    def set_marks(self, answering: int | None, waiting: list[int]) -> None:
        """Mark the chat an answer is being written in (None: no answer) and those whose
        message waits for one."""
        before = {c.id: self._mark(c.id) for c in self.rows}
        self.answering, self.waiting = answering, set(waiting)
        for row, c in enumerate(self.rows):
            if self._mark(c.id) != before[c.id]:
                self.dataChanged.emit(self.index(row), self.index(row))

    def row_of(self, cid: int) -> int:
        return next((i for i, c in enumerate(self.rows) if c.id == cid), -1)

    def put_first(self, conv: Conversation) -> None:
        """Insert or move a conversation to the top (it has the newest activity)."""
        row = self.row_of(conv.id)
        if row == 0:
            # its group may change (Yesterday -> Today), and with it the heading above the
            # next row: the list lays out its rows' heights again
            self.layoutAboutToBeChanged.emit()
            self.rows[0], self.headings = conv, None
            self.layoutChanged.emit()
            return
        if row > 0:
            self.beginMoveRows(QModelIndex(), row, row, QModelIndex(), 0)
            self.rows.insert(0, self.rows.pop(row))
            self.rows[0], self.headings = conv, None
            self.endMoveRows()
            self.dataChanged.emit(self.index(0), self.index(0))
            return
        self.beginInsertRows(QModelIndex(), 0, 0)
        self.rows.insert(0, conv)
        self.headings = None
        self.endInsertRows()

    def remove(self, cid: int) -> None:
        row = self.row_of(cid)
        if row >= 0:
            self.beginRemoveRows(QModelIndex(), row, row)
            del self.rows[row]
            self.headings = None
            self.endRemoveRows()


class MessageListModel(QAbstractListModel):
    """The messages of the open conversation."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Message] = []

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.rows)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self.rows):
            return None
        m = self.rows[index.row()]
        return {
            Qt.ItemDataRole.DisplayRole: m.content,
            IdRole: m.id,
            RoleRole: m.role,
            StatusRole: m.status,
            StatsRole: m.stats,
            EditingRole: m.edit,
        }.get(role)

    def set_rows(self, rows: list[Message]) -> None:
        self.beginResetModel()
        self.rows = list(rows)
        self.endResetModel()

    def append(self, message: Message) -> int:
        row = len(self.rows)
        self.beginInsertRows(QModelIndex(), row, row)
        self.rows.append(message)
        self.endInsertRows()
        return row

    def update(self, row: int, **fields: Any) -> None:
        m = self.rows[row]
        for k, v in fields.items():
            setattr(m, k, v)
        self.dataChanged.emit(self.index(row), self.index(row))

    def truncate(self, row: int) -> None:
        """Remove ``row`` and every row after it."""
        if row < len(self.rows):
            self.beginRemoveRows(QModelIndex(), row, len(self.rows) - 1)
            del self.rows[row:]
            self.endRemoveRows()
