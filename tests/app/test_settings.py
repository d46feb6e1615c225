"""The settings file: saved and read back, and a damaged one costs only what is damaged."""

import json

from app.settings import DEFAULT_SAMPLING, Settings


def test_settings_round_trip(tmp_path, caplog):
    """Saved into a folder not made yet (a first start's data folder) and read back without a
    warning; no file at all (the first start) reads as the defaults."""
    path = tmp_path / "data" / "vptq-chat" / "settings.json"
    assert Settings.load(path) == Settings()
    s = Settings(model="VPTQ-community/x", context=8192, sampling={"temperature": 0.1})
    s.hub_offline = True
    s.save(path)
    back = Settings.load(path)
    assert (back.model, back.context, back.hub_offline) == ("VPTQ-community/x", 8192, True)
    assert back.sampling == {**DEFAULT_SAMPLING, "temperature": 0.1}
    back.context = 2048
    back.save(path)  # over the first, its folder there now
    assert Settings.load(path).context == 2048 and caplog.text == ""


def test_a_damaged_settings_file_keeps_what_is_whole(tmp_path, caplog):
    """A field of the wrong type falls back to its default, with a warning naming the file and
    the field; the others are kept. Not an object at all, or not JSON: all defaults."""
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({
        "model": "mine", "context": "8192", "show_panel": 1, "sampling": 5,
        "first_run_done": True, "hub_proxy": None, "unknown_later_field": 3,
        "hub_endpoint": {"url": "https://mirror.example"},
    }))  # fmt: skip
    s = Settings.load(path)
    assert (s.model, s.first_run_done) == ("mine", True)
    assert (s.context, s.show_panel, s.sampling, s.hub_proxy) == (4096, True, DEFAULT_SAMPLING, "")
    assert s.hub_endpoint == ""  # an object only where the field is one (sampling)
    assert f"{path}: context = '8192' is not of type int; using 4096" in caplog.text
    assert "sampling = 5 is not of type dict" in caplog.text
    # sampling: names the engine does not know and values of the wrong type are dropped
    path.write_text(json.dumps({"sampling": {"temperature": "hot", "top_k": 7, "temprature": 1,
                                             "seed": None, "max_new_tokens": 1.5}}))  # fmt: skip
    assert Settings.load(path).sampling == {**DEFAULT_SAMPLING, "top_k": 7, "seed": None}
    assert "sampling max_new_tokens, temperature, temprature unknown or of the wrong" in caplog.text
    for text in ("[1, 2]", '{"model": ', "\x00\x01"):
        path.write_text(text)
        assert Settings.load(path) == Settings()
    assert f"{path}: not a settings object; using defaults" in caplog.text
    assert f"{path}: unreadable (" in caplog.text
    path.write_bytes(b"\xff\xfe{")  # not UTF-8
    assert Settings.load(path) == Settings()


def test_the_data_folder_follows_the_environment(tmp_path, monkeypatch):
    """$VPTQ_CHAT_DATA, else $XDG_DATA_HOME/vptq-chat, else ~/.local/share/vptq-chat (README)."""
    from app.settings import data_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VPTQ_CHAT_DATA", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "mine"
    monkeypatch.setenv("VPTQ_CHAT_DATA", "")  # empty: not set
    assert data_dir() == tmp_path / "xdg" / "vptq-chat"
    monkeypatch.delenv("VPTQ_CHAT_DATA")
    monkeypatch.setenv("XDG_DATA_HOME", "")
    assert data_dir() == tmp_path / "home" / ".local" / "share" / "vptq-chat"


def test_the_model_and_kernel_folders_follow_the_environment(tmp_path, monkeypatch):
    """engine/paths.py (README): $VPTQ_CHAT_HOME, else $XDG_CACHE_HOME/vptq-chat, else
    ~/.cache/vptq-chat; downloaded models in its hub folder unless $VPTQ_CHAT_MODELS."""
    from engine import paths

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VPTQ_CHAT_MODELS", raising=False)
    monkeypatch.setenv("VPTQ_CHAT_HOME", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert (paths.home(), paths.hub_models()) == (tmp_path / "mine", tmp_path / "mine" / "hub")
    monkeypatch.setenv("VPTQ_CHAT_HOME", "")
    assert paths.home() == tmp_path / "xdg" / "vptq-chat"
    monkeypatch.delenv("VPTQ_CHAT_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert paths.home() == tmp_path / "home" / ".cache" / "vptq-chat"
    monkeypatch.setenv("VPTQ_CHAT_MODELS", str(tmp_path / "models"))
    assert paths.hub_models() == tmp_path / "models"


def test_text_size_steps_and_a_font_given_in_pixels(qapp, monkeypatch):
    """The steps from any size (a hand-edited 105 goes to the next step each way) and their
    ends; a platform whose font is given in pixels is scaled in pixels."""
    from PySide6.QtGui import QFont

    from app.ui import fonts

    assert fonts.next_size(100, 1) == 110 and fonts.next_size(100, -1) == 90
    assert fonts.next_size(105, 1) == 110 and fonts.next_size(105, -1) == 100
    assert fonts.next_size(200, 1) == 200 and fonts.next_size(70, -1) == 70
    assert fonts.next_size(500, -1) == 200 and fonts.next_size(10, 1) == 70
    assert (fonts.clamp(10), fonts.clamp(125), fonts.clamp(500)) == (70, 125, 200)
    pixels = QFont("Sans")
    pixels.setPixelSize(12)
    monkeypatch.setattr(fonts.QFontDatabase, "systemFont", lambda _kind: QFont(pixels))
    assert fonts.scaled_font(150).pixelSize() == 18
    assert fonts.scaled_font(70).pixelSize() == 8
