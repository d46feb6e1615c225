"""Conversations and messages in SQLite (WAL, FTS5 search). No Qt inside.

Every write commits at once, so a crash or a kill loses nothing that was written: the partial
answer being streamed (saved every few hundred milliseconds) and the unsent draft included.
The schema carries a version (``PRAGMA user_version``); opening a newer database is refused.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import valid_sampling

UNTITLED = "New chat"  # a chat's title until its first message (or the user) names it

SCHEMA_VERSION = 3  # 2: answer_versions; 3: messages.edit
EXPORT_FORMAT = "vptq-chat-conversation"
EXPORT_VERSION = 1  # an export's layout; import reads this one and refuses later ones

_SCHEMA = """
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    sampling TEXT NOT NULL DEFAULT '{}',
    draft TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'done' CHECK (status IN ('done', 'streaming', 'stopped', 'error')),
    stats TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id');
CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER messages_au AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
"""
# Version 2: the earlier answers to a message, kept when Regenerate writes another (they were
# deleted); the answer shown is the message row, its versions go with the question.
_SCHEMA_2 = """
CREATE TABLE answer_versions (
    id INTEGER PRIMARY KEY,
    question_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    content TEXT NOT NULL,
    status TEXT NOT NULL,
    stats TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX answer_versions_by_question ON answer_versions(question_id, created);
"""
# Version 3: a message's edit in progress (NULL: none), kept as the composer's draft is (it was
# held in memory and lost at quit).
_SCHEMA_3 = "ALTER TABLE messages ADD COLUMN edit TEXT;"


def _json_object(text: str) -> dict:
    """A stored JSON object (a chat's sampling, an answer's stats); {} where the text is not
    one, so that a damaged field costs its settings or numbers, not the chat."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


MATCH_OPEN, MATCH_CLOSE = "\x02", "\x03"  # around a matched word in a search's snippet


def search_words(query: str) -> list[str]:
    """The words a search looks for (double quotes dropped: FTS5 syntax, not the user's)."""
    return [w.replace('"', "") for w in query.split() if w.strip('"')]


@dataclass
class Hit:
    """A chat a search found: its best-matching message and a snippet of it."""

    conversation_id: int
    message_id: int
    snippet: str


@dataclass
class AnswerVersion:
    """An answer to a message, the one shown (``current``: the message row itself) or one kept
    when Regenerate wrote another."""

    id: int
    content: str
    status: str
    stats: dict[str, Any]
    created: float
    current: bool = False


class StoreError(Exception):
    """A history file that cannot be used; the message names it and what to do."""


@dataclass
class Conversation:
    id: int
    title: str
    system_prompt: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    draft: str = ""
    updated: float = 0.0


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    status: str = "done"
    stats: dict[str, Any] = field(default_factory=dict)
    edit: str | None = None  # the text of an edit in progress (not sent), None where none


def _status(item: dict) -> str:
    """An imported message's or version's status: "stopped" or "error" where the file says so,
    "stopped" for an answer exported while it was being written (it holds what it had then),
    else "done"."""
    status = item.get("status")
    if status == "streaming":
        return "stopped"
    return status if status in ("stopped", "error") else "done"


def _check_versions(m: dict, n: int, source: str, after_question: bool) -> None:
    """Message ``n`` of an import: its answer's versions, where it has them, as export_json
    writes them (StoreError naming the message and field otherwise)."""
    if "versions" not in m:
        return
    versions, shown = m["versions"], m.get("shown")
    where = f"{source}: message {n}"
    if m["role"] != "assistant" or not after_question:
        raise StoreError(f"{where}: only an answer to a message can have 'versions'")
    if not isinstance(versions, list) or not all(
        isinstance(v, dict) and isinstance(v.get("content"), str) for v in versions
    ):
        raise StoreError(f"{where}: 'versions' must be a list of {{content, status, stats}}")
    if not (isinstance(shown, int) and not isinstance(shown, bool) and 0 <= shown < len(versions)):
        raise StoreError(
            f"{where}: 'shown' must be the place of the answer shown in 'versions' (0 to "
            f"{len(versions) - 1}), not {shown!r}"
        )


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"{self.path}: the chat history cannot be opened ({e}); move the file away "
                "to start a new history"
            ) from e
        # Answers that were streaming when the app last stopped are kept, marked stopped.
        self.db.execute("UPDATE messages SET status='stopped' WHERE status='streaming'")

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer VPTQ Chat (schema {version}); update the app"
            )
        steps = {  # from each version to this one
            0: _SCHEMA + _SCHEMA_2 + _SCHEMA_3,
            1: _SCHEMA_2 + _SCHEMA_3,
            2: _SCHEMA_3,
        }
        if version in steps:
            self.db.executescript(
                f"BEGIN; {steps[version]} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )

    def close(self) -> None:
        self.db.close()

    # -- conversations -----------------------------------------------------------------------
    def create_conversation(
        self, title: str = UNTITLED, system_prompt: str = "", sampling: dict | None = None
    ) -> Conversation:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO conversations(title, system_prompt, sampling, created, updated) "
            "VALUES (?, ?, ?, ?, ?)",
            (title, system_prompt, json.dumps(sampling or {}), now, now),
        )
        return self.conversation(cur.lastrowid)

    def conversation(self, cid: int) -> Conversation:
        row = self.db.execute(
            "SELECT id, title, system_prompt, sampling, draft, updated FROM conversations "
            "WHERE id=?",
            (cid,),
        ).fetchone()
        if row is None:
            raise KeyError(cid)
        sampling = valid_sampling(_json_object(row[3]))  # what the engine takes, of it
        return Conversation(row[0], row[1], row[2], sampling, row[4], row[5])

    def conversations(self) -> list[Conversation]:
        rows = self.db.execute("SELECT id FROM conversations ORDER BY updated DESC, id DESC")
        return [self.conversation(r[0]) for r in rows.fetchall()]

    def update_conversation(self, cid: int, **fields: Any) -> None:
        allowed = {"title", "system_prompt", "sampling", "draft"}
        if not set(fields) <= allowed:
            raise ValueError(f"unknown conversation fields: {set(fields) - allowed}")
        if "sampling" in fields:
            fields["sampling"] = json.dumps(fields["sampling"])
        sets = ", ".join(f"{k}=?" for k in fields)
        touch = ", updated=?" if set(fields) - {"draft"} else ""
        values = [*fields.values(), *([time.time()] if touch else []), cid]
        self.db.execute(f"UPDATE conversations SET {sets}{touch} WHERE id=?", values)

    def delete_conversation(self, cid: int) -> None:
        self.db.execute("DELETE FROM conversations WHERE id=?", (cid,))

    # -- messages ------------------------------------------------------------------------------
    def add_message(self, cid: int, role: str, content: str, status: str = "done") -> Message:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO messages(conversation_id, role, content, status, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (cid, role, content, status, now),
        )
        self.db.execute("UPDATE conversations SET updated=? WHERE id=?", (now, cid))
        return self.message(cur.lastrowid)

    def message(self, mid: int) -> Message:
        row = self.db.execute(
            "SELECT id, conversation_id, role, content, status, stats, edit FROM messages "
            "WHERE id=?",
            (mid,),
        ).fetchone()
        if row is None:
            raise KeyError(mid)
        return Message(row[0], row[1], row[2], row[3], row[4], _json_object(row[5]), row[6])

    def messages(self, cid: int) -> list[Message]:
        rows = self.db.execute(
            "SELECT id FROM messages WHERE conversation_id=? ORDER BY id", (cid,)
        ).fetchall()
        return [self.message(r[0]) for r in rows]

    def update_message(
        self,
        mid: int,
        content: str | None = None,
        status: str | None = None,
        stats: dict | None = None,
    ) -> None:
        fields = {
            "content": content,
            "status": status,
            "stats": None if stats is None else json.dumps(stats),
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        if fields:
            sets = ", ".join(f"{k}=?" for k in fields)
            self.db.execute(f"UPDATE messages SET {sets} WHERE id=?", [*fields.values(), mid])

    def set_edit(self, mid: int, text: str | None) -> None:
        """Message ``mid``'s edit in progress: its text so far, None where it ended (sent or
        cancelled). A message deleted meanwhile is passed over."""
        self.db.execute("UPDATE messages SET edit=? WHERE id=?", (text, mid))

    def recent_answer_stats(self, limit: int = 30) -> list[dict]:
        """The stats of the last ``limit`` answers that have a writing speed, in any chat,
        oldest first (the live panel's plot after a restart). A row whose stats are not JSON is
        passed over, not an error: the window opens whatever one message holds."""
        rows = self.db.execute(
            "SELECT stats FROM messages WHERE role='assistant' AND CASE WHEN json_valid(stats) "
            "THEN json_extract(stats, '$.decode_tok_s') END > 0 ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [json.loads(r[0]) for r in reversed(rows)]

    def delete_messages_from(self, cid: int, mid: int) -> None:
        """Delete message ``mid`` and everything after it (regenerate, edit and resend)."""
        self.db.execute("DELETE FROM messages WHERE conversation_id=? AND id>=?", (cid, mid))

    # -- answer versions -------------------------------------------------------------------------
    def keep_answer(self, answer: Message, question_id: int) -> None:
        """Keep ``answer`` (about to be written again) as a version of the answer to message
        ``question_id``."""
        (created,) = self.db.execute(
            "SELECT created FROM messages WHERE id=?", (answer.id,)
        ).fetchone()
        self._add_version(question_id, answer.content, answer.status, answer.stats, created)

    def _add_version(
        self, question_id: int, content: str, status: str, stats: dict, created: float
    ) -> None:
        self.db.execute(
            "INSERT INTO answer_versions(question_id, content, status, stats, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (question_id, content, status, json.dumps(stats), created),
        )

    def answer_versions(self, question_id: int, answer_id: int) -> list[AnswerVersion]:
        """The answers to message ``question_id`` in the order they were written: the kept ones
        and the one shown, ``answer_id`` (``current``; its id that of the message)."""
        rows = self.db.execute(
            "SELECT id, content, status, stats, created, 0 FROM answer_versions "
            "WHERE question_id=? UNION ALL "
            "SELECT id, content, status, stats, created, 1 FROM messages WHERE id=? "
            "ORDER BY 5, 1",
            (question_id, answer_id),
        ).fetchall()
        return [AnswerVersion(r[0], r[1], r[2], _json_object(r[3]), r[4], bool(r[5])) for r in rows]

    def show_answer_version(self, answer_id: int, version_id: int) -> None:
        """Message ``answer_id`` becomes kept version ``version_id`` of it, and that version the
        answer it was (each keeps its text, status, stats and time of writing)."""
        a = self.db.execute(
            "SELECT content, status, stats, created FROM messages WHERE id=?", (answer_id,)
        ).fetchone()
        v = self.db.execute(
            "SELECT content, status, stats, created FROM answer_versions WHERE id=?",
            (version_id,),
        ).fetchone()
        if a is None or v is None:
            raise KeyError(answer_id if a is None else version_id)
        self.db.execute("BEGIN")
        with self.db:  # both or neither: committed, or rolled back where one fails
            self.db.execute(
                "UPDATE messages SET content=?, status=?, stats=?, created=? WHERE id=?",
                (*v, answer_id),
            )
            self.db.execute(
                "UPDATE answer_versions SET content=?, status=?, stats=?, created=? WHERE id=?",
                (*a, version_id),
            )

    # -- search, export, import ------------------------------------------------------------------
    def search(self, query: str, limit: int = 50) -> list[Hit]:
        """The chats with messages matching ``query`` (its words, each a prefix), best first:
        each with its best message and a snippet of it, the matched words between MATCH_OPEN
        and MATCH_CLOSE (characters no typed text holds; brackets could be the message's own)."""
        words = search_words(query)
        if not words:
            return []
        match = " ".join(f'"{w}"*' for w in words)
        rows = self.db.execute(
            "SELECT m.conversation_id, m.id, "
            f"snippet(messages_fts, 0, '{MATCH_OPEN}', '{MATCH_CLOSE}', '…', 8) "
            "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
            "WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?",
            (match, limit),
        ).fetchall()
        seen: dict[int, Hit] = {}
        for cid, mid, snip in rows:
            seen.setdefault(cid, Hit(cid, mid, snip))
        return list(seen.values())

    def export_json(self, cid: int) -> dict[str, Any]:
        """The chat as a file holds it: each message with its stats, and where not "done" its
        status; an answer Regenerate wrote again with all its versions in the order they were
        written ("versions", each its text, status and stats) and which one is shown ("shown",
        from 0): they were left out."""
        c = self.conversation(cid)
        messages, question = [], None
        for m in self.messages(cid):
            out = {"role": m.role, "content": m.content, "stats": m.stats}
            if m.status != "done":
                out["status"] = m.status
            versions = self.answer_versions(question, m.id) if question else []
            if len(versions) > 1:
                out["versions"] = [
                    {"content": v.content, "status": v.status, "stats": v.stats} for v in versions
                ]
                out["shown"] = next(i for i, v in enumerate(versions) if v.current)
            messages.append(out)
            question = m.id if m.role == "user" else None
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "title": c.title,
            "system_prompt": c.system_prompt,
            "sampling": c.sampling,
            "messages": messages,
        }

    def export_markdown(self, cid: int) -> str:
        c = self.conversation(cid)
        parts = [f"# {c.title}\n"]
        if c.system_prompt:
            parts.append(f"*System:* {c.system_prompt}\n")
        for m in self.messages(cid):
            parts.append(f"## {'You' if m.role == 'user' else 'Assistant'}\n\n{m.content}\n")
        return "\n".join(parts)

    def import_json(self, data: Any, source: str = "file") -> Conversation:
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise StoreError(f"{source}: not a VPTQ Chat conversation export")
        version = data.get("version", EXPORT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StoreError(f"{source}: 'version' must be a whole number from 1, not {version!r}")
        if version > EXPORT_VERSION:
            raise StoreError(
                f"{source}: exported by a newer VPTQ Chat (format version {version}; this one "
                f"reads version {EXPORT_VERSION}): update VPTQ Chat to import it"
            )
        msgs = data.get("messages")
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict)
            and m.get("role") in ("user", "assistant")
            and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise StoreError(f"{source}: 'messages' must be a list of {{role, content}}")
        for n, m in enumerate(msgs, 1):  # all checked before anything is imported
            _check_versions(m, n, source, after_question=n > 1 and msgs[n - 2]["role"] == "user")
        c = self.create_conversation(
            str(data.get("title") or "Imported chat"),
            str(data.get("system_prompt") or ""),
            data.get("sampling") if isinstance(data.get("sampling"), dict) else {},
        )
        question = None
        for m in msgs:
            msg = self.add_message(c.id, m["role"], m["content"], _status(m))
            if isinstance(m.get("stats"), dict):
                self.update_message(msg.id, stats=m["stats"])
            (created,) = self.db.execute(
                "SELECT created FROM messages WHERE id=?", (msg.id,)
            ).fetchone()
            for i, v in enumerate(m.get("versions", [])):
                if i != m["shown"]:  # the others around it, in their order
                    stats = v.get("stats") if isinstance(v.get("stats"), dict) else {}
                    when = created + (i - m["shown"]) * 1e-3
                    self._add_version(question, v["content"], _status(v), stats, when)
            question = msg.id if msg.role == "user" else None
        return self.conversation(c.id)
