"""The history store on a real SQLite file."""

import json
import sqlite3
import time

import pytest

from app.store import SCHEMA_VERSION, Store, StoreError


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "history.sqlite3")
    yield s
    s.close()


def test_conversations_and_messages_persist(tmp_path):
    s = Store(tmp_path / "h.db")
    c = s.create_conversation("First", system_prompt="Be brief.", sampling={"temperature": 0.2})
    s.add_message(c.id, "user", "Hello")
    a = s.add_message(c.id, "assistant", "Hi", status="streaming")
    s.update_message(a.id, content="Hi there", status="done", stats={"decode_tok_s": 12.5})
    s.update_conversation(c.id, title="Renamed", draft="unsent words")
    other = s.create_conversation("Second")
    elsewhere = s.add_message(other.id, "user", "Another chat")
    s.close()
    s = Store(tmp_path / "h.db")
    c2 = s.conversation(c.id)
    assert (c2.title, c2.system_prompt, c2.sampling, c2.draft) == (
        "Renamed",
        "Be brief.",
        {"temperature": 0.2},
        "unsent words",
    )
    msgs = s.messages(c.id)
    assert [(m.role, m.content, m.status) for m in msgs] == [
        ("user", "Hello", "done"),
        ("assistant", "Hi there", "done"),
    ]
    assert msgs[1].stats == {"decode_tok_s": 12.5}
    assert [m.conversation_id for m in msgs] == [c.id, c.id] and other.id != c.id
    assert s.message(a.id) == msgs[1]
    assert s.message(elsewhere.id).conversation_id == other.id
    assert [m.content for m in s.messages(other.id)] == ["Another chat"]
    with pytest.raises(KeyError):
        s.message(elsewhere.id + 1)
    db = sqlite3.connect(tmp_path / "h.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_streaming_answer_left_behind_is_marked_stopped(tmp_path):
    s = Store(tmp_path / "h.db")
    c = s.create_conversation()
    s.add_message(c.id, "assistant", "half an ans", status="streaming")
    s.close()
    s = Store(tmp_path / "h.db")
    assert [(m.content, m.status) for m in s.messages(c.id)] == [("half an ans", "stopped")]


def test_recent_answer_speeds_across_chats(tmp_path):
    """The live panel's plot after a restart: the last answers with a speed, in any chat,
    oldest first; answers without one (an error, a user message) are left out."""
    s = Store(tmp_path / "h.db")
    a, b = s.create_conversation("a"), s.create_conversation("b")
    for i, cid in enumerate([a.id, b.id, a.id, b.id, a.id]):
        s.add_message(cid, "user", f"question {i}")
        m = s.add_message(cid, "assistant", "")
        s.update_message(m.id, content="x", stats={"decode_tok_s": 10.0 + i, "ttft_s": 0.1})
    failed = s.add_message(b.id, "assistant", "")
    s.update_message(failed.id, status="error", stats={"decode_tok_s": 0, "error": "oom"})
    broken = s.add_message(b.id, "assistant", "")
    s.db.execute("UPDATE messages SET stats='{\"decode_tok_s\": 9' WHERE id=?", (broken.id,))
    s.close()
    s = Store(tmp_path / "h.db")
    assert [st["decode_tok_s"] for st in s.recent_answer_stats(3)] == [12.0, 13.0, 14.0]
    assert [st["decode_tok_s"] for st in s.recent_answer_stats()] == [10.0, 11.0, 12.0, 13.0, 14.0]
    s.delete_conversation(a.id)
    assert [st["decode_tok_s"] for st in s.recent_answer_stats()] == [11.0, 13.0]
    s.close()


def test_a_damaged_field_costs_its_numbers_not_the_chat(tmp_path):
    """A chat's sampling or an answer's stats that are not a JSON object read as {}: the chat
    list and the chat still open (json.loads raised, and the window could not start)."""
    s = Store(tmp_path / "h.db")
    c = s.create_conversation("kept", sampling={"temperature": 0.2})
    s.add_message(c.id, "user", "question")
    a = s.add_message(c.id, "assistant", "answer")
    b = s.add_message(c.id, "assistant", "another")
    s.db.execute("UPDATE conversations SET sampling='{\"temperature\": 0.' WHERE id=?", (c.id,))
    s.db.execute("UPDATE messages SET stats='[1, 2]' WHERE id=?", (a.id,))  # JSON, not an object
    s.db.execute("UPDATE messages SET stats='{\"decode' WHERE id=?", (b.id,))  # not JSON
    s.close()
    s = Store(tmp_path / "h.db")
    assert [(x.title, x.sampling) for x in s.conversations()] == [("kept", {})]
    assert [(m.content, m.stats) for m in s.messages(c.id)] == [
        ("question", {}),
        ("answer", {}),
        ("another", {}),
    ]
    s.close()


def test_order_rename_delete(store):
    a = store.create_conversation("a")
    store.create_conversation("b")
    store.add_message(a.id, "user", "newer activity")
    assert [c.title for c in store.conversations()] == ["a", "b"]
    store.delete_conversation(a.id)
    assert [c.title for c in store.conversations()] == ["b"]
    assert store.messages(a.id) == []  # cascaded


def test_full_text_search(store):
    a = store.create_conversation("cooking")
    store.add_message(a.id, "user", "How do I make a béchamel sauce?")
    b = store.create_conversation("space")
    m = store.add_message(b.id, "assistant", "Jupiter is the largest planet")
    assert [h.conversation_id for h in store.search("sauce")] == [a.id]
    assert [h.conversation_id for h in store.search("plan")] == [b.id]  # prefix match
    (hit,) = store.search("jupiter")
    assert (hit.message_id, hit.snippet) == (m.id, "\x02Jupiter\x03 is the largest planet")
    store.add_message(b.id, "user", "[Jupiter] in brackets, and jupiter again")
    best = store.add_message(b.id, "assistant", "jupiter jupiter jupiter jupiter: the moons")
    (hit,) = store.search("jupiter")  # one hit a chat: its best-ranked message
    assert hit.message_id == best.id and hit.snippet.count("\x02jupiter\x03") == 4
    store.update_message(m.id, content="Saturn has rings")
    assert store.search("saturn")[0].conversation_id == b.id
    assert store.search('"; DROP TABLE messages') == []
    assert store.search("   ") == []


def test_delete_from_message(store):
    c = store.create_conversation()
    ids = [
        store.add_message(c.id, r, t).id
        for r, t in [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    ]
    store.delete_messages_from(c.id, ids[2])
    assert [m.content for m in store.messages(c.id)] == ["q1", "a1"]


def test_earlier_answers_are_kept_as_versions_and_shown_again(store):
    """Regenerate keeps the answer it replaces as a version of the answer to its question;
    showing a version swaps it with the answer shown, each keeping its text, status, stats and
    time; deleting the question (an edit) takes its versions with it."""
    c = store.create_conversation()
    q = store.add_message(c.id, "user", "q")
    first = store.add_message(c.id, "assistant", "first answer")
    store.update_message(first.id, stats={"decode_tok_s": 1.0})
    store.keep_answer(store.message(first.id), q.id)
    store.delete_messages_from(c.id, first.id)  # as Regenerate does
    second = store.add_message(c.id, "assistant", "second, stopped", status="stopped")
    versions = store.answer_versions(q.id, second.id)
    assert [(v.content, v.status, v.stats, v.current) for v in versions] == [
        ("first answer", "done", {"decode_tok_s": 1.0}, False),
        ("second, stopped", "stopped", {}, True),
    ]
    assert versions[0].created < versions[1].created and versions[1].id == second.id
    store.show_answer_version(second.id, versions[0].id)
    shown = store.message(second.id)
    assert (shown.content, shown.status, shown.stats) == (
        "first answer",
        "done",
        {"decode_tok_s": 1.0},
    )
    assert [m.content for m in store.messages(c.id)] == ["q", "first answer"]
    again = store.answer_versions(q.id, second.id)
    assert [(v.content, v.current) for v in again] == [
        ("first answer", True),
        ("second, stopped", False),
    ]
    assert [v.created for v in again] == [v.created for v in versions]  # each kept its time
    assert [h.message_id for h in store.search("first")] == [second.id]  # the shown one's text
    with pytest.raises(KeyError) as missing:
        store.show_answer_version(second.id, versions[0].id + 100)
    assert missing.value.args == (versions[0].id + 100,)  # the version that is not there
    assert store.message(second.id).content == "first answer"  # nothing half-done
    # written for good: another connection (the next start) reads the swap
    assert Store(store.path).message(second.id).content == "first answer"
    # a swap that fails halfway is undone whole, and the history goes on working
    store.db.execute(
        "CREATE TEMP TRIGGER refuse BEFORE UPDATE ON answer_versions "
        "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    with pytest.raises(sqlite3.DatabaseError, match="disk full"):
        store.show_answer_version(second.id, versions[0].id)
    store.db.execute("DROP TRIGGER refuse")
    assert store.message(second.id).content == "first answer"  # the message's update undone
    store.show_answer_version(second.id, versions[0].id)  # no transaction left open
    assert store.message(second.id).content == "second, stopped"
    store.show_answer_version(second.id, versions[0].id)
    other = store.create_conversation()
    store.add_message(other.id, "user", "unrelated")
    store.delete_messages_from(c.id, q.id)  # the question edited: its answers go
    assert store.db.execute("SELECT COUNT(*) FROM answer_versions").fetchone()[0] == 0


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_history_gains_the_later_tables_and_keeps_its_chats(tmp_path, version):
    from app.store import _SCHEMA, _SCHEMA_2

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        _SCHEMA + (_SCHEMA_2 if version == 2 else "") + f"PRAGMA user_version={version};"
    )
    db.execute("INSERT INTO conversations(title, created, updated) VALUES ('kept', 1, 1)")
    db.execute(
        "INSERT INTO messages(conversation_id, role, content, created) VALUES (1, 'user', 'hi', 1)"
    )
    db.commit()
    db.close()
    s = Store(path)
    assert [c.title for c in s.conversations()] == ["kept"]
    assert [(m.content, m.edit) for m in s.messages(1)] == [("hi", None)]
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    answer = s.add_message(1, "assistant", "a")
    s.keep_answer(answer, 1)
    assert [v.content for v in s.answer_versions(1, answer.id)] == ["a", "a"]
    s.set_edit(1, "hi again")
    s.close()
    assert Store(path).message(1).edit == "hi again"


def test_an_edit_in_progress_is_kept_until_it_ends(tmp_path):
    path = tmp_path / "h.db"
    s = Store(path)
    c = s.create_conversation()
    q = s.add_message(c.id, "user", "first")
    a = s.add_message(c.id, "assistant", "answer")
    s.set_edit(q.id, "first, with more")
    s.close()
    s = Store(path)  # as after a quit
    assert [(m.content, m.edit) for m in s.messages(c.id)] == [
        ("first", "first, with more"),
        ("answer", None),
    ]
    assert s.search("more") == []  # not sent: not the chat's text
    assert s.export_json(c.id)["messages"][0] == {"role": "user", "content": "first", "stats": {}}
    s.set_edit(q.id, "")  # emptied, still being edited
    assert s.message(q.id).edit == ""
    s.set_edit(q.id, None)  # cancelled
    assert s.message(q.id).edit is None
    s.delete_messages_from(c.id, q.id)
    s.set_edit(a.id, "gone")  # a message deleted meanwhile: nothing to keep it in
    assert s.messages(c.id) == []


def test_export_import_round_trip(store):
    c = store.create_conversation("Trip", system_prompt="sys", sampling={"top_p": 0.9})
    store.add_message(c.id, "user", "q")
    a = store.add_message(c.id, "assistant", "```python\nprint(1)\n```")
    store.update_message(a.id, stats={"decode_tok_s": 3.0})
    data = json.loads(json.dumps(store.export_json(c.id)))
    data["sampling"].update(temperature="warm", bogus=1)  # dropped on import: the engine refuses
    d = store.import_json(data)
    assert d.id != c.id and (d.title, d.system_prompt, d.sampling) == (
        "Trip",
        "sys",
        {"top_p": 0.9},
    )
    assert [(m.role, m.content, m.stats) for m in store.messages(d.id)] == [
        ("user", "q", {}),
        ("assistant", "```python\nprint(1)\n```", {"decode_tok_s": 3.0}),
    ]
    assert store.export_markdown(c.id) == (
        "# Trip\n\n*System:* sys\n\n## You\n\nq\n\n## Assistant\n\n```python\nprint(1)\n```\n"
    )
    plain = store.create_conversation("No system prompt")
    store.add_message(plain.id, "user", "hi")
    assert store.export_markdown(plain.id) == "# No system prompt\n\n## You\n\nhi\n"


@pytest.mark.parametrize(
    "bad",
    [[], {"format": "other"}, {"format": "vptq-chat-conversation", "messages": [{"role": "x"}]}],
)
def test_import_refuses_other_files(store, bad):
    with pytest.raises(StoreError, match=r"chat\.json"):
        store.import_json(bad, "chat.json")


def test_an_export_holds_its_format_and_version_and_a_newer_one_is_refused(store):
    c = store.create_conversation("V", sampling={"top_k": 5})
    store.add_message(c.id, "user", "q")
    data = store.export_json(c.id)
    assert data == {
        "format": "vptq-chat-conversation",
        "version": 1,
        "title": "V",
        "system_prompt": "",
        "sampling": {"top_k": 5},
        "messages": [{"role": "user", "content": "q", "stats": {}}],
    }
    before = len(store.conversations())
    for version, why in [
        (2, r"old\.json: exported by a newer VPTQ Chat \(format version 2; this one reads "
            r"version 1\): update VPTQ Chat to import it$"),
        ("1", r"old\.json: 'version' must be a whole number from 1, not '1'"),
        (0, r"not 0"),
        (True, r"not True"),
    ]:  # fmt: skip
        with pytest.raises(StoreError, match=why):
            store.import_json({**data, "version": version}, "old.json")
    assert len(store.conversations()) == before  # nothing half-imported
    del data["version"]  # written before the field was: read as version 1
    assert [m.content for m in store.messages(store.import_json(data).id)] == ["q"]


def test_only_a_conversations_own_fields_can_be_updated(store):
    c = store.create_conversation("Keep")
    with pytest.raises(ValueError, match=r"unknown conversation fields: \{'colour'\}"):
        store.update_conversation(c.id, title="Lost", colour="red")
    assert store.conversation(c.id).title == "Keep"
    every = dict(title="T", system_prompt="S", sampling={"seed": 1}, draft="D")
    store.update_conversation(c.id, **every)
    got = store.conversation(c.id)
    assert (got.title, got.system_prompt, got.sampling, got.draft) == ("T", "S", {"seed": 1}, "D")


def test_corrupt_or_newer_database(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"bad\.db: the chat history cannot be opened"):
        Store(bad)
    newer = tmp_path / "newer.db"
    sqlite3.connect(newer).execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer VPTQ Chat"):
        Store(newer)


def test_a_history_in_a_folder_not_made_yet_makes_it(tmp_path):
    """The app's data folder may not exist on a first start (a fresh XDG_DATA_HOME)."""
    path = tmp_path / "new" / "deeper" / "history.sqlite3"
    s = Store(path)
    s.create_conversation("first")
    s.close()
    assert path.is_file() and [c.title for c in Store(path).conversations()] == ["first"]


def test_a_missing_conversation_is_a_key_error_and_an_empty_update_changes_nothing(store):
    c = store.create_conversation("here")
    with pytest.raises(KeyError):
        store.conversation(c.id + 1)
    m = store.add_message(c.id, "assistant", "kept", status="done")
    store.update_message(m.id)  # no field given: nothing to set, no SQL error
    got = store.messages(c.id)[0]
    assert (got.content, got.status, got.stats) == ("kept", "done", {})


def test_an_export_keeps_an_answer_s_versions_and_statuses(store):
    """Regenerate's kept answers and a stopped or failed answer's status go into the JSON
    export and come back on import, in their order, the same one shown (they were left out,
    and every answer came back "done")."""
    c = store.create_conversation("Versions")
    q = store.add_message(c.id, "user", "q")
    answer = None
    for text, status, stats in [
        ("first", "stopped", {"decode_tok_s": 1.0}),
        ("second", "done", {"decode_tok_s": 2.0}),
        ("third", "error", {}),
    ]:  # as Regenerate writes them: the answer kept, then written again
        if answer is not None:
            store.keep_answer(store.message(answer.id), q.id)
            store.delete_messages_from(c.id, answer.id)
            time.sleep(0.002)
        answer = store.add_message(c.id, "assistant", text, status=status)
        store.update_message(answer.id, stats=stats)
    (kept,) = [v.id for v in store.answer_versions(q.id, answer.id) if v.content == "second"]
    store.show_answer_version(answer.id, kept)  # "second" shown, "third" kept after it
    q2 = store.add_message(c.id, "user", "q2")
    store.add_message(c.id, "assistant", "only", status="streaming")
    data = json.loads(json.dumps(store.export_json(c.id)))
    answer = data["messages"][1]
    assert answer == {
        "role": "assistant",
        "content": "second",
        "stats": {"decode_tok_s": 2.0},
        "versions": [
            {"content": "first", "status": "stopped", "stats": {"decode_tok_s": 1.0}},
            {"content": "second", "status": "done", "stats": {"decode_tok_s": 2.0}},
            {"content": "third", "status": "error", "stats": {}},
        ],
        "shown": 1,
    }
    assert data["messages"][3] == {
        "role": "assistant", "content": "only", "stats": {}, "status": "streaming",
    }  # fmt: skip
    assert "versions" not in data["messages"][0] and q2.id
    d = store.import_json(data)
    rows = store.messages(d.id)
    assert [(m.content, m.status) for m in rows] == [
        ("q", "done"), ("second", "done"), ("q2", "done"), ("only", "stopped"),
    ]  # fmt: skip
    versions = store.answer_versions(rows[0].id, rows[1].id)
    assert [(v.content, v.status, v.stats, v.current) for v in versions] == [
        ("first", "stopped", {"decode_tok_s": 1.0}, False),
        ("second", "done", {"decode_tok_s": 2.0}, True),
        ("third", "error", {}, False),
    ]
    assert store.export_json(d.id)["messages"] == [
        *data["messages"][:3], {**data["messages"][3], "status": "stopped"},
    ]  # fmt: skip
    # two versions, the first shown
    two = {**answer, "versions": answer["versions"][:2], "shown": 0, "content": "first"}
    two["stats"] = {"decode_tok_s": 1.0}
    e = store.import_json({**data, "messages": [data["messages"][0], two]})
    rows = store.messages(e.id)
    assert [v.content for v in store.answer_versions(rows[0].id, rows[1].id)] == [
        "first", "second",
    ]  # fmt: skip
    assert store.export_json(e.id)["messages"][1]["shown"] == 0


@pytest.mark.parametrize(
    "change, why",
    [
        ({"versions": "x"}, r"message 2: 'versions' must be a list of \{content, status, stats\}"),
        ({"versions": [{"content": 1}]}, r"message 2: 'versions' must be a list"),
        ({"shown": 3}, r"message 2: 'shown' must be the place of the answer shown in 'versions' "
                       r"\(0 to 1\), not 3"),
        ({"shown": True}, r"message 2: 'shown' must .*, not True"),
        ({"shown": None}, r"message 2: 'shown' must .*, not None"),
    ],
)  # fmt: skip
def test_an_import_with_damaged_versions_names_the_message_and_imports_nothing(store, change, why):
    answer = {"role": "assistant", "content": "b", "versions": [{"content": "a"}, {"content": "b"}]}
    data = {
        "format": "vptq-chat-conversation",
        "messages": [{"role": "user", "content": "q"}, {**answer, "shown": 1, **change}],
    }
    before = len(store.conversations())
    with pytest.raises(StoreError, match=r"^chat\.json: " + why):
        store.import_json(data, "chat.json")
    question = {"role": "user", "content": "q"}
    for n, msgs in [
        (1, [{**answer, "shown": 0}]),
        (1, [{**answer, "shown": 0}, question]),  # the message after it is no question of it
        (3, [question, {"role": "assistant", "content": "a"}, {**answer, "shown": 0}]),
    ]:
        orphan = {"format": "vptq-chat-conversation", "messages": msgs}
        with pytest.raises(StoreError, match=rf"message {n}: only an answer to a message can"):
            store.import_json(orphan, "chat.json")
    assert len(store.conversations()) == before  # nothing half-imported
