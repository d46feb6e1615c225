"""The Qt models under Qt's model tester, through every kind of change they make."""

from app.store import Conversation, Message
from app.ui.models import ConversationListModel, IdRole, MessageListModel, StatusRole


def test_conversation_model(qtmodeltester):
    renamed = []
    m = ConversationListModel(rename=lambda cid, t: renamed.append((cid, t)))
    qtmodeltester.check(m)
    m.set_rows([Conversation(1, "a"), Conversation(2, "b"), Conversation(3, "c")])
    m.put_first(Conversation(3, "c2"))  # move to the top
    m.put_first(Conversation(4, "d"))  # insert at the top
    m.put_first(Conversation(4, "d2"))  # already first: update in place
    assert [c.title for c in m.rows] == ["d2", "c2", "a", "b"]
    assert m.setData(m.index(2), "renamed")
    assert renamed == [(1, "renamed")] and m.index(2).data() == "renamed"
    assert not m.setData(m.index(2), "   ")
    m.remove(2)
    assert [m.index(i).data(IdRole) for i in range(m.rowCount())] == [4, 3, 1]
    qtmodeltester.check(m)


def test_message_model_updates_only_the_changed_row(qtmodeltester):
    m = MessageListModel()
    qtmodeltester.check(m)
    m.set_rows([Message(1, 1, "user", "q"), Message(2, 1, "assistant", "")])
    changed = []
    m.dataChanged.connect(lambda a, b, roles=(): changed.append((a.row(), b.row())))
    m.update(1, content="partial", status="streaming")
    assert changed == [(1, 1)] and m.index(1).data(StatusRole) == "streaming"
    m.append(Message(3, 1, "user", "again"))
    m.truncate(1)
    assert m.rowCount() == 1
    qtmodeltester.check(m)


def test_time_groups_of_chats():
    """Local calendar days, not 24-hour spans: a chat from 23:00 is Yesterday at 01:00."""
    from datetime import datetime

    from app.ui.models import day_group

    now = datetime(2026, 12, 7, 1, 0).timestamp()
    cases = [
        (datetime(2026, 12, 7, 0, 30), "Today"),
        (datetime(2026, 12, 8, 9, 0), "Today"),  # a clock set back: not a future group
        (datetime(2026, 12, 6, 23, 0), "Yesterday"),  # two hours ago
        (datetime(2026, 12, 5, 23, 59), "Previous 7 days"),
        (datetime(2026, 12, 1, 0, 0), "Previous 7 days"),  # 6 days
        (datetime(2026, 11, 30, 12, 0), "Previous 30 days"),  # 7 days
        (datetime(2026, 11, 8, 12, 0), "Previous 30 days"),  # 29 days
        (datetime(2026, 11, 7, 12, 0), "November 2026"),  # 30 days
        (datetime(2025, 3, 1, 12, 0), "March 2025"),
    ]
    assert [day_group(when.timestamp(), now) for when, _ in cases] == [g for _, g in cases]


def test_conversation_model_headings_follow_the_rows_and_the_day(qtmodeltester):
    from datetime import datetime

    from PySide6.QtCore import Qt

    from app.ui.models import GroupRole

    now = [datetime(2026, 12, 7, 12, 0).timestamp()]
    day = 86400
    m = ConversationListModel()
    m.clock = lambda: now[0]
    qtmodeltester.check(m)
    rows = [
        Conversation(1, "a", updated=now[0] - 60),
        Conversation(2, "b", updated=now[0] - 120),
        Conversation(3, "c", updated=now[0] - day),
        Conversation(4, "d", updated=now[0] - 40 * day),
    ]
    m.set_rows(rows)

    def headings():
        return [m.index(i).data(GroupRole) for i in range(m.rowCount())]

    described = Qt.ItemDataRole.AccessibleDescriptionRole  # each row's group, for screen readers
    assert [m.index(i).data(described) for i in range(4)] == [  # asked for before the headings
        "Today", "Today", "Yesterday", "October 2026",
    ]  # fmt: skip
    assert headings() == ["Today", "", "Yesterday", "October 2026"]
    m.put_first(Conversation(3, "c", updated=now[0]))  # yesterday's chat written in today
    assert [c.id for c in m.rows] == [3, 1, 2, 4]
    assert headings() == ["Today", "", "", "October 2026"]
    m.put_first(Conversation(5, "e", updated=now[0]))  # a new one
    assert headings() == ["Today", "", "", "", "October 2026"]
    m.remove(5)
    m.remove(3)
    m.remove(1)
    assert headings() == ["Today", "October 2026"]
    laid_out = []
    m.layoutChanged.connect(lambda *_: laid_out.append(1))
    m.new_day()
    assert not laid_out  # the same day: nothing to do
    now[0] += day  # past midnight, the app left open
    m.new_day()
    assert laid_out and headings() == ["Yesterday", "October 2026"]
    m.set_rows(rows, {1: "a \x02match\x03"})  # a search: in the order of the match, no headings
    assert headings() == ["", "", "", ""]
    assert m.index(0).data(described) is None
    m.set_rows(rows[:1])
    m.put_first(Conversation(1, "a", updated=now[0]))  # already first: its group moves on
    assert headings() == ["Today"]
    qtmodeltester.check(m)
