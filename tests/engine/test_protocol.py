"""The JSON-lines protocol: round trip and refusal of malformed lines."""

import json

import pytest

from engine.protocol import PROTOCOL_VERSION, ProtocolError, decode, encode


def test_round_trip():
    line = encode("delta", "r1", text="héllo\nwörld 🎉")
    assert line.endswith("\n") and line.count("\n") == 1
    msg = decode(line)
    assert (msg.type, msg.id, msg.payload) == ("delta", "r1", {"text": "héllo\nwörld 🎉"})
    assert json.loads(line)["v"] == PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "load"}', "protocol version None"),
        ('{"v": 99, "type": "load"}', "protocol version 99"),
        ('{"v": 1, "type": "explode"}', "unknown message type"),
        ('{"v": 1, "type": "load", "id": 5}', "'id' must be a string"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_lines(line, why):
    with pytest.raises(ProtocolError, match=why):
        decode(line)
