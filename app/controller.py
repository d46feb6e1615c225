"""ChatController: the chat's logic between the store, the engine client and the Qt models.

It holds no widgets. A streamed answer is accumulated in memory, shown through the message
model at most ~10 times a second, and written to SQLite at least every half second, so a
crash of the engine or of the app keeps everything but the last fraction of a second.

The engine writes one answer at a time. Opening another chat does not stop it: it goes on
being written into its own chat (saved as above, shown again when that chat is opened). A
message sent in another chat meanwhile waits its turn: its answer starts when the one before
it ends, in the order they were sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from .engine_client import PROCESS_ENDED, EngineClient, EngineError
from .gpu import device_index
from .hub import model_label
from .settings import Settings, valid_sampling
from .store import UNTITLED, Message, Store, search_words
from .ui.models import ConversationListModel, MessageListModel

log = logging.getLogger("app.chat")
REPAINT_MS = 100
SAVE_S = 0.5
# What brings a dead engine back (said wherever the user meets one).
RESTART_HINT = "Model > Restart engine starts it again"
# How a model gets loaded (said wherever the user meets none).
LOAD_WAYS = "Model > Load demo model, or Browse and download models"
LOAD_HINT = f"This chat waits for a model, and is answered once one is loaded: {LOAD_WAYS}."


class ChatController(QObject):
    busy_changed = Signal(bool)
    conversation_opened = Signal(int)
    error = Signal(str)
    status = Signal(str)
    context_changed = Signal(int, int, int)  # prompt tokens, context, dropped messages
    answer_finished = Signal(dict)  # stats of the finished answer
    live_rate = Signal(float)  # tokens/s of the answer being streamed
    load_progress = Signal(float, str)  # a load's stage and how far it is (0..1)
    leaving = Signal()  # the open chat is about to change: the window saves its draft now
    # settings changed (a model loaded): saved at once, not only at quit (a killed or crashed
    # app started again with the model before the last one)
    settings_changed = Signal()
    reveal = Signal(int, list)  # a message row a search found, and the words to mark in it
    # the open chat's last answer: which of the answers to its question it is, of how many
    # (1, 1: the only one; Regenerate keeps the one it replaces)
    answer_versions = Signal(int, int)
    # what the open chat says about answers elsewhere: where one is written, or that its own
    # message waits for it; "" if nothing
    queue_note = Signal(str)
    send_allowed = Signal(bool)  # whether the open chat takes a message now

    def __init__(self, store: Store, client: EngineClient, settings: Settings):
        super().__init__()
        self.store, self.client, self.settings = store, client, settings
        self.conversations = ConversationListModel(rename=self.rename)
        self.messages = MessageListModel()
        self.current: int | None = None
        # chat settings edited with no chat open: what the next new chat starts with
        self.next_chat: tuple[str, dict[str, Any]] | None = None
        self.active: dict[str, Any] | None = None  # the request being streamed
        self.waiting: list[int] = []  # chats whose last message waits for an answer, in turn
        self.continuing: set[int] = set()  # of those, the ones waiting to continue their answer
        self.task: asyncio.Task | None = None
        # clear while an unload is under way: a load waits for it (a stuck engine's unload ends
        # in its restart, which a load sent meanwhile did not survive)
        self.not_unloading = asyncio.Event()
        self.not_unloading.set()
        self.loads_waiting = 0  # loads waiting for an unload
        self.found: dict[int, int] = {}  # the search's chats: chat id -> its best message id
        self.found_words: list[str] = []
        self.repaint = QTimer(self, interval=REPAINT_MS)
        self.repaint.timeout.connect(self._flush)
        self.conversations.set_rows(store.conversations())

    @property
    def busy(self) -> bool:
        return self.active is not None

    # -- conversations ---------------------------------------------------------------------------
    def open(self, cid: int) -> None:
        if cid == self.current:  # a click on the open chat changes nothing
            return
        self.leaving.emit()
        before = self.current
        self.current = cid
        self.next_chat = None  # what was set with no chat open is for a chat started from there
        self.messages.set_rows(self.store.messages(cid))
        self._show_answer()
        self.conversation_opened.emit(cid)
        self._show_versions()
        self._reveal_found(cid)
        self._show_context()
        self._tell_answering()
        if before is not None:
            self._drop_if_unused(before)

    def _reveal_found(self, cid: int) -> None:
        """A chat opened from a search: its best-matching message, with the words marked."""
        mid = self.found.get(cid)
        rows = [i for i, m in enumerate(self.messages.rows) if m.id == mid]
        if rows:
            self.reveal.emit(rows[0], self.found_words)

    def _drop_if_unused(self, cid: int) -> None:
        """A chat left as New chat made it (no message, draft, title or setting of the user's)
        goes, so that New chat and a click elsewhere do not leave empty chats in the list."""
        try:
            conv = self.store.conversation(cid)
        except KeyError:  # deleted already
            return
        unused = (
            conv.title == UNTITLED
            and not conv.draft.strip()
            and conv.system_prompt == self.settings.system_prompt
            and _same_sampling(conv.sampling, self.chat_defaults())
            and not self.store.messages(cid)
        )
        if unused:
            self.store.delete_conversation(cid)
            self.conversations.remove(cid)

    def _answering(self, cid: int | None) -> bool:
        """Whether the answer being written is in chat ``cid``."""
        return self.active is not None and self.active["message"].conversation_id == cid

    def _show_answer(self) -> None:
        """Back in the chat whose answer is being written: its row shows all the text so far
        (the store's copy is up to half a second behind) and is the one the stream updates."""
        a = self.active
        if a is None or not self._answering(self.current):
            return
        mid = a["message"].id
        a["row"] = next(i for i, m in enumerate(self.messages.rows) if m.id == mid)
        self.messages.update(a["row"], content=a["text"], status="streaming")
        self._show_waiting(a)

    def can_send(self) -> bool:
        """Whether the open chat takes a message now: not while its own answer is written or
        its message waits for one (a chat answers one message at a time)."""
        return not self._answering(self.current) and self.current not in self.waiting

    def _tell_answering(self) -> None:
        """The sidebar marks the chat being answered and those waiting; the open chat says
        where the model is answering, if elsewhere, and whether its own message waits."""
        a = self.active
        cid = a["message"].conversation_id if a is not None else None
        self.conversations.set_marks(cid, self.waiting)
        self.send_allowed.emit(self.can_send())
        note = ""
        if cid is None and self.current in self.waiting:  # no model to answer it now
            note = (
                f"This chat waits for the engine, which is not running: {RESTART_HINT}."
                if self.client.state in ("stopped", "failed")
                else LOAD_HINT
            )
        if cid is not None and cid != self.current:
            title = "a deleted chat"  # its answer is being stopped
            with contextlib.suppress(KeyError):
                title = f"“{self.store.conversation(cid).title}”"
            if self.current in self.waiting:
                ahead = self.waiting.index(self.current)
                more = f" and {ahead} more waiting before it" if ahead else ""
                note = (
                    "This chat waits its turn: the model answers here after the answer in "
                    f"{title}{more}. Stop ends that answer now."
                )
            else:
                note = (
                    f"The model is answering in {title}. A message you send here waits for it "
                    "and is answered next; Stop ends that answer now."
                )
        self.queue_note.emit(note)

    def _show_context(self) -> None:
        """The open chat's context line: what its last answer left in the model's context (the
        prompt and the answer) and how many old messages it left out, kept with that answer's
        stats (the warning went when the chat was opened again); none before a first answer;
        while its answer is written, what the engine said it started with."""
        if self._answering(self.current) and "started" in self.active:
            self.context_changed.emit(*self.active["started"])
            return
        for m in reversed(self.messages.rows):
            if m.role == "assistant" and m.stats.get("n_ctx"):
                used = m.stats.get("context_tokens") or (  # (answers before it was kept)
                    m.stats.get("prompt_tokens", 0) + m.stats.get("completion_tokens", 0)
                )
                self.context_changed.emit(
                    used, m.stats["n_ctx"], m.stats.get("dropped_messages", 0)
                )
                return
        self.context_changed.emit(0, 0, 0)

    def new_conversation(self) -> int:
        system, sampling = self.next_chat or (self.settings.system_prompt, self.chat_defaults())
        self.next_chat = None
        c = self.store.create_conversation(system_prompt=system, sampling=dict(sampling))
        self.conversations.put_first(c)
        self.open(c.id)
        return c.id

    def recommended(self) -> dict[str, Any]:
        """The sampling the loaded model recommends (its generation_config.json, as the engine
        read it), of the settings the chat settings show."""
        return valid_sampling(self.client.loaded.get("sampling"))

    def chat_defaults(self) -> dict[str, Any]:
        """What a new chat's sampling starts from: the app's defaults, with what the loaded
        model recommends over them (Qwen2.5's top-k 20, top-p 0.8, ...)."""
        return {**self.settings.sampling, **self.recommended()}

    def rename(self, cid: int, title: str) -> None:
        self.store.update_conversation(cid, title=title)
        if self._answering(cid):
            self._tell_answering()

    def delete(self, cid: int) -> None:
        if self._answering(cid):
            self.stop()
        if cid in self.waiting:
            self.waiting.remove(cid)
        self.continuing.discard(cid)
        if cid == self.current:
            self.current = None
            self.messages.set_rows([])
        self.store.delete_conversation(cid)
        self.conversations.remove(cid)
        self._tell_answering()

    def search(self, query: str) -> None:
        """The list shows the chats holding ``query``, each with a snippet of its best match; a
        chat opened from it shows that message with the words marked ("" ends the search)."""
        hits = self.store.search(query) if query.strip() else []
        self.found = {h.conversation_id: h.message_id for h in hits}
        self.found_words = search_words(query)
        if not query.strip():
            self.conversations.set_rows(self.store.conversations())
            return
        self.conversations.set_rows(
            [self.store.conversation(h.conversation_id) for h in hits],
            {h.conversation_id: h.snippet for h in hits},
        )

    def save_draft(self, text: str) -> None:
        if self.current is not None:
            self.store.update_conversation(self.current, draft=text)

    def save_edit(self, mid: int, text: str | None) -> None:
        """Message ``mid``'s edit in progress (None: ended), kept in the history so that it
        waits for its chat to open again, also after a quit."""
        self.store.set_edit(mid, text)
        for m in self.messages.rows:
            if m.id == mid:
                m.edit = text  # (the chat's widgets show it already)

    def update_settings(self, system_prompt: str, sampling: dict[str, Any]) -> None:
        if self.current is None:  # kept for the chat the next message (or New chat) starts
            self.next_chat = (system_prompt, dict(sampling))
            return
        self.store.update_conversation(self.current, system_prompt=system_prompt, sampling=sampling)

    # -- chat ----------------------------------------------------------------------------------
    def send(self, text: str) -> bool:
        """Save the user's message and start the answer, or, while the model answers in
        another chat, queue it: it is answered when the answers before it end. False if nothing
        was sent."""
        if not text.strip() or not self.can_send():
            return False
        if self.current is None:
            self.new_conversation()
        cid = self.current
        self.messages.append(self.store.add_message(cid, "user", text))
        conv = self.store.conversation(cid)
        if conv.title == UNTITLED:
            self.store.update_conversation(cid, title=_title_from(text))
        self.store.update_conversation(cid, draft="")
        self.conversations.put_first(self.store.conversation(cid))
        self._answer_or_wait()
        return True

    def _next_waiting(self) -> None:
        """Start the answer of the first chat whose message waits (deleted or changed ones
        are passed over). Not while no model can answer (_no_model) or the engine is being
        stopped (quitting, Restart engine): the messages keep waiting for the next load."""
        if self.client.closing or self._no_model():
            self._tell_answering()
            return
        while self.waiting and self.active is None:
            cid = self.waiting.pop(0)
            rows = self.store.messages(cid)
            last = rows[-1] if rows else None
            if cid in self.continuing:
                self.continuing.discard(cid)
                if last and can_continue(last.role, last.status, last.stats, last.content):
                    self._continue(last)
            elif last and last.role == "user":
                self._generate(cid=cid)
        self._tell_answering()

    def stop(self) -> None:
        if self.active is not None:
            self.client.cancel(self.active["id"])

    def regenerate(self) -> None:
        """Answer the last user message again, replacing the last answer (in turn, while the
        model answers in another chat)."""
        if not self.can_send() or not self.messages.rows:
            return
        last = self.messages.rows[-1]
        if last.role == "assistant":
            question = self._question_of_last()
            if question is not None and _worth_keeping(last):  # the answer stays a version
                self.store.keep_answer(last, question.id)
            self.store.delete_messages_from(last.conversation_id, last.id)
            self.messages.truncate(len(self.messages.rows) - 1)
            self._show_context()  # the answer that filled it went
        if self.messages.rows and self.messages.rows[-1].role == "user":
            self._answer_or_wait()

    def _question_of_last(self) -> Message | None:
        """The user message the open chat's last answer answers (None: no such pair)."""
        rows = self.messages.rows
        if len(rows) < 2 or rows[-1].role != "assistant" or rows[-2].role != "user":
            return None
        return rows[-2]

    def _versions(self) -> tuple[list, int]:
        """The answers to the open chat's last question, and which of them is shown (([], 0)
        where its last message is not an answer to one)."""
        question = self._question_of_last()
        if question is None:
            return [], 0
        versions = self.store.answer_versions(question.id, self.messages.rows[-1].id)
        return versions, next(i for i, v in enumerate(versions) if v.current)

    def _show_versions(self) -> None:
        versions, at = self._versions()
        self.answer_versions.emit(at + 1, max(len(versions), 1))

    def show_answer_version(self, step: int) -> None:
        """The last answer's earlier (step -1) or later (+1) version in its place, in the chat
        and in what the model reads next (not while the chat's answer is written)."""
        if not self.can_send():
            return
        versions, at = self._versions()
        if not 0 <= at + step < len(versions):
            return
        answer = self.messages.rows[-1]
        self.store.show_answer_version(answer.id, versions[at + step].id)
        shown = self.store.message(answer.id)
        row = len(self.messages.rows) - 1
        self.messages.update(row, content=shown.content, status=shown.status, stats=shown.stats)
        self._show_context()
        self._show_versions()

    def _answer_or_wait(self) -> None:
        """Answer the open chat's last message now, or after the answer being written, or
        where no model is loaded (none yet, a failed load, the engine stopped) once one is."""
        if self._must_wait():
            self._wait()
        else:
            self._generate()

    def _must_wait(self) -> bool:
        return self.busy or self._no_model()

    def _wait(self) -> None:
        """The open chat's request goes to the queue (_next_waiting starts it)."""
        self.waiting.append(self.current)
        self._tell_answering()

    def edit_and_resend(self, row: int, text: str) -> None:
        """Replace user message ``row`` with ``text``, drop everything after it, resend (in
        turn, while the model answers in another chat)."""
        if not self.can_send() or not text.strip() or self.current is None:
            return
        m = self.messages.rows[row]
        conv = self.store.conversation(self.current)
        # A title the first message gave (not one the user chose) follows its edit: send()
        # titles an untitled chat from the message it sends.
        if row == 0 and conv.title == _title_from(m.content):
            self.store.update_conversation(conv.id, title=UNTITLED)
        self.store.delete_messages_from(self.current, m.id)
        self.messages.truncate(row)
        self.send(text)

    def history(self, cid: int | None = None) -> list[dict[str, str]]:
        """The messages the model reads for chat ``cid`` (None: the open one)."""
        cid = self.current if cid is None else cid
        conv = self.store.conversation(cid)
        rows = self.messages.rows if cid == self.current else self.store.messages(cid)
        out = [{"role": "system", "content": conv.system_prompt}] if conv.system_prompt else []
        out += [
            {"role": m.role, "content": m.content}
            for m in rows
            if m.content and m.status != "error"
        ]
        return out

    def continue_answer(self) -> None:
        """Write more of the last answer, one that was stopped, cut at the token limit or ended
        by an error (in turn, while the model answers in another chat)."""
        if not self.can_send() or not self.messages.rows:
            return
        last = self.messages.rows[-1]
        if not can_continue(last.role, last.status, last.stats, last.content):
            return
        if self._must_wait():
            self.continuing.add(self.current)
            self._wait()
            return
        self._continue(last)

    def _no_model(self) -> bool:
        """Whether no model is there to answer: the engine holds none (it started without one,
        or a load failed after letting the last go), or it is not running. Not during a
        restart after a crash, which reloads the model (requests made meanwhile are sent
        then)."""
        c = self.client
        return c.state in ("ready", "stopped", "failed") and not c.recovering

    def _continue(self, last: Message) -> None:
        """More of ``last``, its chat's last answer (in the open chat or another)."""
        row = next((i for i, m in enumerate(self.messages.rows) if m.id == last.id), -1)
        self.store.update_message(last.id, status="streaming")
        if row >= 0:
            self.messages.update(row, status="streaming")
        self._generate(answer=last, row=row, cid=last.conversation_id)

    def _generate(
        self, answer: Message | None = None, row: int = -1, cid: int | None = None
    ) -> None:
        """A new answer to the history of chat ``cid`` (None: the open one), or with ``answer``
        (the last message, at ``row``) more of that one, its text and token count going on
        from where they are."""
        conv = self.store.conversation(self.current if cid is None else cid)
        history = self.history(conv.id)
        more = answer is not None
        if answer is None:
            answer = self.store.add_message(conv.id, "assistant", "", status="streaming")
            row = self.messages.append(answer) if conv.id == self.current else -1
        id_, queue = self.client.generate(
            history, sampling=conv.sampling or self.chat_defaults(), continue_final=more
        )
        self.active = {
            "id": id_,
            "row": row,
            "message": answer,
            "text": answer.content,
            "before": answer.stats.get("completion_tokens", 0) if more else 0,
            "tokens": 0,
            "t0": time.monotonic(),
            "saved": time.monotonic(),
            "dirty": False,
        }
        self._show_waiting(self.active)
        self.busy_changed.emit(True)
        self._tell_answering()
        self.repaint.start()
        self.task = asyncio.ensure_future(self._consume(queue, self.active))

    async def _consume(self, queue: asyncio.Queue, a: dict[str, Any]) -> None:
        errors: list[tuple[str, str]] = []  # (kind, message)
        while True:
            msg = await queue.get()
            if msg.type == "started":
                a["context"] = (msg.get("n_ctx", 0), msg.get("dropped_messages", 0))
                a["started"] = (msg.get("prompt_tokens", 0), *a["context"])
                if a["message"].conversation_id == self.current:
                    self.context_changed.emit(*a["started"])
                    self._started(a)
            elif msg.type == "delta":
                a["text"] += msg.get("text", "")
                a["tokens"] = _so_far(msg.get("tokens"), a["tokens"])
                a["dirty"] = True
                if time.monotonic() - a["saved"] > SAVE_S:
                    self.store.update_message(a["message"].id, content=a["text"])
                    a["saved"] = time.monotonic()
            elif msg.type == "error":
                errors.append((msg.get("kind", ""), msg.get("message", "unknown error")))
            elif msg.type == "finished":
                self._finish(a, msg.get("reason", "error"), msg.get("stats") or {}, errors)
                return

    def _show_waiting(self, a: dict[str, Any]) -> None:
        """Until the engine begins answer ``a`` (it loads a model first, minutes for a large
        one), its row in the open chat says it waits for the load, not that it is written."""
        if a["row"] >= 0 and "started" not in a and self.client.state != "loaded":
            stats = self.messages.rows[a["row"]].stats
            self.messages.update(a["row"], stats={**stats, "waiting": "load"})

    def _started(self, a: dict[str, Any]) -> None:
        """The engine began the answer: its row no longer says it waits for a load."""
        rows = self.messages.rows
        if a["row"] < len(rows) and rows[a["row"]].id == a["message"].id:
            stats = rows[a["row"]].stats
            if "waiting" in stats:
                self.messages.update(
                    a["row"], stats={k: v for k, v in stats.items() if k != "waiting"}
                )

    def _flush(self) -> None:
        a = self.active
        if a is None or not a["dirty"]:
            return
        a["dirty"] = False
        if a["message"].conversation_id == self.current:
            self.messages.update(a["row"], content=a["text"])
        elapsed = time.monotonic() - a["t0"]
        if elapsed > 0:
            self.live_rate.emit(a["tokens"] / elapsed)

    def _finish(
        self, a: dict[str, Any], reason: str, stats: dict, errors: list[tuple[str, str]]
    ) -> None:
        self.repaint.stop()
        status = {"stop": "done", "length": "done", "cancelled": "stopped"}.get(reason, "error")
        if reason == "length":
            stats = {**stats, "truncated": True}
        n_ctx, dropped = a.get("context", (0, 0))
        if n_ctx and "completion_tokens" in stats:  # the context line after the answer
            used = stats.get("prompt_tokens", 0) + stats["completion_tokens"]
            stats = {**stats, "n_ctx": n_ctx, "context_tokens": used}
            if a["message"].conversation_id == self.current:
                self.context_changed.emit(used, n_ctx, dropped)
        timed = bool(stats)  # an engine that died mid-answer sent none
        if status == "error" and "completion_tokens" not in stats and a["tokens"]:
            # its tokens are those that came, so that Continue counts on from them (it counted
            # only its own)
            stats = {**stats, "completion_tokens": a["tokens"]}
        if stats:  # the model that wrote it (the one loaded: a load waits for the answer)
            stats = {**stats, "model": model_label(self.client.loaded.get("model"))}
        if a["before"] and "completion_tokens" in stats:  # a continued answer: all its tokens
            stats = {**stats, "completion_tokens": a["before"] + stats["completion_tokens"]}
        text = a["text"]
        if status == "error" and not text:
            text = "⚠ " + ("; ".join(m for _, m in errors) or "the engine could not answer")
        self.store.update_message(a["message"].id, content=text, status=status, stats=stats)
        if a["message"].conversation_id == self.current and a["row"] < len(self.messages.rows):
            self.messages.update(a["row"], content=text, status=status, stats=stats)
            self._show_versions()
        self.active = None
        self.busy_changed.emit(False)
        self._tell_answering()
        # The window shows a crash from the engine's state, and a stop is the user's own restart:
        # an answer they end gets no second banner.
        news = [
            f"{message}; {RESTART_HINT}" if kind == "not_running" else message
            for kind, message in errors
            if kind not in PROCESS_ENDED
        ]
        if news:
            self.error.emit("; ".join(news))
        if timed:
            self.answer_finished.emit(stats)
        self._next_waiting()

    # -- import / export -------------------------------------------------------------------------
    def import_json(self, data: Any, source: str) -> int:
        c = self.store.import_json(data, source)
        self.conversations.put_first(c)
        self.open(c.id)
        return c.id

    # -- engine ----------------------------------------------------------------------------------
    async def start_engine(self) -> None:
        """Start the engine and load the configured model. A failed start needs no error signal:
        the client's "failed" state carries its message to the window."""
        try:
            await self.client.start()
        except EngineError:
            return
        await self.load_model(self.settings.model)

    async def restart_engine(self) -> None:
        """Model > Restart engine: stop the engine (it cancels an answer in progress, which keeps
        what it has; one it does not finish in time is killed) and start it again with the
        model. After the engine crashed too often to be restarted by itself, this brings it
        back."""
        await self.client.shutdown()
        await self.start_engine()

    async def load_model(
        self, path: str, context: int | None = None, device: str | None = None
    ) -> None:
        """Load a model with ``context`` tokens of context on ``device`` (None: the last used of
        each), which become the ones used from then on once the load succeeds (the Models
        window's fit chooses a GPU by choosing its device). The engine lets the loaded model go
        before it loads another; where the new one fails (not found, damaged, too large for the
        memory), the one loaded before is loaded again, so a failed try does not leave the chat
        without a model; one the engine refuses before letting its model go (no model there)
        leaves that model loaded. A load asked for during an unload starts after it."""
        if not self.not_unloading.is_set():
            self.status.emit(f"{model_label(path)} loads once the engine has let the model go…")
        self.loads_waiting += 1
        try:
            await self.not_unloading.wait()
        finally:
            self.loads_waiting -= 1
        if self.client.state in ("stopped", "failed"):  # a load starts a dead engine again
            try:
                await self.client.start()
            except EngineError:
                return  # the "failed" state tells the window why
        before = self.client.last_load if self.client.state == "loaded" else None
        device = device or self._saved_device()
        self.status.emit(f"Loading {model_label(path)}…")
        n_ctx = context or self.settings.context
        try:
            await self.client.load(
                path,
                device=None if device == "auto" else device,
                max_seq_len=n_ctx,
                on_progress=self._progress,
            )
        except EngineError as e:
            if e.kind in PROCESS_ENDED:  # the window tells of the engine's end
                return
            why = f"Could not load {path}: {e}"
            if before is not None and self.client.state == "loaded":  # refused, nothing let go
                self.error.emit(f"{why}. The model loaded now, {before['path']}, stays loaded.")
                return
            if before is None or (before["path"], before["max_seq_len"]) == (path, n_ctx):
                self.error.emit(why)
                return
            self.status.emit(f"Loading {model_label(before['path'])} again…")
            try:
                await self.client.load(**before)
            except EngineError as again:
                if again.kind not in PROCESS_ENDED:
                    self.error.emit(f"{why}. Loading {before['path']} again failed too: {again}")
                return
            self.error.emit(
                f"{why}. The model loaded before, {before['path']}, is loaded again "
                f"({before['max_seq_len']} tokens of context)."
            )
            self._next_waiting()
            return
        self.settings.model = path  # the window shows it ready (the engine's "loaded" state)
        self.settings.context = n_ctx
        self.settings.device = device
        self.settings_changed.emit()
        self._next_waiting()  # messages that waited for a stopped engine

    async def unload_model(self) -> bool:
        """Model > Unload model: the model's memory back to the GPU (or the CPU) without
        quitting; an answer being written is stopped first and keeps what it has. Messages
        sent meanwhile wait for the next load. The next start loads the model again. True
        where the engine says the model is gone.

        An engine that does not answer within a minute (stuck in a step, a driver hang) is
        stopped, killed where it must be, and started again without a model: its memory is
        then back for certain, and the window does not show a model gone that still holds
        the GPU."""
        self.stop()
        self.not_unloading.clear()
        try:
            return await self._unload()
        finally:
            self.not_unloading.set()

    async def _unload(self) -> bool:
        try:
            await self.client.unload()
        except EngineError as e:  # it failed after the model went, or the engine ended (its
            # restart has no model)
            if e.kind not in PROCESS_ENDED:  # the model went, its memory may not have
                self.error.emit(
                    f"Could not unload the model: {e}. Model > Restart engine gives its memory "
                    "back for certain."
                )
            return False
        except asyncio.TimeoutError:
            self.status.emit("The engine did not let the model go: restarting it…")
            await self.client.shutdown()
            try:
                await self.client.start()
            except EngineError:
                return False  # the "failed" state tells the window why
            then = (
                "the model asked for meanwhile loads now"
                if self.loads_waiting
                else f"{LOAD_WAYS}, loads one"
            )
            self.error.emit(
                "The engine did not let the model go within a minute, so it was stopped and "
                f"started again without a model: the model's memory is free; {then}."
            )
            return False
        return True

    def _saved_device(self) -> str:
        """The settings' device, or auto where it names a GPU the engine no longer lists (one
        taken out, or hidden by CUDA_VISIBLE_DEVICES): the model then loads on the engine's
        first GPU instead of failing at every start."""
        device, seen = self.settings.device, self.client.hello.get("cuda_devices")
        if seen is None or not device.startswith("cuda:"):
            return device
        if all(d.get("index") != device_index(device) for d in seen):
            log.warning("device %s is gone (the engine sees %d GPUs): auto", device, len(seen))
            return "auto"
        return device

    def _progress(self, fraction: float, stage: str) -> None:
        self.status.emit(f"{stage}: {fraction:.0%}")
        self.load_progress.emit(fraction, stage)


def _so_far(sent: Any, counted: int) -> int:
    """An answer's tokens after a delta: the count the engine sent with it (a piece can hold
    several tokens, and the text held back at the end comes without a new one), else one more
    than before (an engine that sends none)."""
    if isinstance(sent, int) and not isinstance(sent, bool):
        return max(sent, counted)
    return counted + 1


def _worth_keeping(answer: Message) -> bool:
    """An answer Regenerate keeps as a version: one with text of the model's (not the note of
    an engine that could not answer)."""
    failed = answer.status == "error" and answer.content.startswith("⚠ ")
    return bool(answer.content.strip()) and not failed


def can_continue(role: str, status: str, stats: dict, text: str) -> bool:
    """Whether a message is an answer that can be written on: stopped, cut at the token limit
    or ended by an error (the engine crashed mid-answer), with some text to go on from."""
    stopped = status in ("stopped", "error") or bool(stats.get("truncated"))
    return role == "assistant" and stopped and bool(text)


def _same_sampling(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same settings, as the chat settings panel writes them back: its seed of None (the
    random one) stands for no seed."""
    return {k: v for k, v in a.items() if v is not None} == {
        k: v for k, v in b.items() if v is not None
    }


FENCE_MARK = re.compile(r"```[\w+-]*")
# **strong** around words (not 2**10 or a ** b: a word character outside the marks or a space
# inside them leaves them as typed). __x__ stays: in a question it is mostly Python's __init__.
STRONG = re.compile(r"(?<!\w)\*\*(?=\S)(.+?)(?<=\S)\*\*(?!\w)")


def _title_from(text: str) -> str:
    """A chat's title from its first message: its first words, without code fences' marks (a
    message that opened with a code block was titled "```python def ...") or bold marks (the
    list showed "Show me **bold** text" as typed)."""
    text = STRONG.sub(r"\1", text)
    words = FENCE_MARK.sub(" ", text).split() or text.split()
    title = " ".join(words[:8])
    return title[:60] + ("…" if len(words) > 8 or len(title) > 60 else "")
