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
