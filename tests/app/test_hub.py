"""The catalogue, file metadata, token store and download manager against a fake hub on
127.0.0.1 that injects faults. Each fault test checks the end state on disk."""

import asyncio
import hashlib
import json
import os
from pathlib import Path
from unittest.mock import patch

import pytest

from app.downloads import MANIFEST, DownloadManager
from app.hub import (
    INSTALLED,
    Hub,
    HubError,
    HubSettings,
    bytes_on_disk,
    local_models,
    parse_name,
    save_token,
    scheme_from_config,
    token,
)

from .fake_hub import FakeHub, Repo

CHUNK = 16384
REPO = "VPTQ-community/Tiny-0.1B-Instruct-v8-k256-0-woft"


def payload(n: int, seed: int) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def tiny_repo(repo_id=REPO, **kw) -> Repo:
    files = {
        "config.json": json.dumps({"hidden_size": 64}).encode(),
        "model-00001-of-00002.safetensors": payload(300_000, 1),
        "model-00002-of-00002.safetensors": payload(200_000, 2),
        "tokenizer.json": b'{"version": "1.0"}',
    }
    return Repo(repo_id, files, **kw)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    with FakeHub() as fake:
        fake.stall_seconds = 2.0
        fake.add(tiny_repo())
        yield fake


def make_hub(fake, tmp_path, **kw) -> Hub:
    return Hub(HubSettings(endpoint=fake.url, **kw), tmp_path / "hub-cache")


def manager(fake, tmp_path, on_change=lambda d: None, **kw) -> DownloadManager:
    opts = dict(stall_after=0.3, read_timeout=1.0, backoff=0.05, max_retries=3, chunk_size=CHUNK)
    opts["speed_window"] = 0.5
    return DownloadManager(make_hub(fake, tmp_path), tmp_path / "models", on_change, **opts | kw)


STALL_SPEEDS: list[float] = []  # the speed shown while a download is stalled


def record(states: list, d) -> None:
    if d.state == "stalled":
        STALL_SPEEDS.append(d.speed)
    if not states or states[-1] != d.state:
        states.append(d.state)


def run_download(fake, tmp_path, repo=REPO, before=None, **kw):
    """Download ``repo``; returns (the final Download, every state it went through)."""
    states = []
    STALL_SPEEDS.clear()

    async def main():
        m = manager(
            fake,
            tmp_path,
            lambda d: record(states, d),
            **kw,
        )
        d = m.start(repo)
        if before:
            await before(m, d)
        d = await m.wait(repo)
        m.close()
        return d

    return asyncio.run(main()), states


def assert_installed(fake, tmp_path, repo=REPO):
    folder = tmp_path / "models" / repo
    assert (folder / INSTALLED).exists() and not (folder / MANIFEST).exists()
    for path, data in fake.repos[repo].files.items():
        assert (folder / path).read_bytes() == data, path
    assert not list(folder.rglob("*.part"))


def assert_not_installed(tmp_path, repo=REPO):
    assert not (tmp_path / "models" / repo / INSTALLED).exists()


# -- names, configs --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "base", "params", "family", "v", "k", "kr", "bits"),
    [
        ("Meta-Llama-3.1-70B-Instruct-v8-k65536-256-woft", "Meta-Llama-3.1-70B-Instruct", 70,
         "Llama 3.1", 8, 65536, 256, 3.0),
        ("Meta-Llama-3.1-8B-Instruct-v12-k65536-4096-woft", "Meta-Llama-3.1-8B-Instruct", 8,
         "Llama 3.1", 12, 65536, 4096, 28 / 12),
        ("Qwen2.5-72B-Instruct-v16-k65536-65536-woft", "Qwen2.5-72B-Instruct", 72, "Qwen 2.5",
         16, 65536, 65536, 2.0),
        ("Qwen2.5-0.5B-Instruct-v8-k65536-0-woft", "Qwen2.5-0.5B-Instruct", 0.5, "Qwen 2.5",
         8, 65536, 0, 2.0),
        # its name gives no size: the published one (it was "?", and no size filter held it)
        ("Mistral-Large-Instruct-2407-v8-k65536-65536-woft", "Mistral-Large-Instruct-2407",
         123, "Mistral", 8, 65536, 65536, 4.0),
        # sizes in millions ("?" before) and a lower-case b (the tech report's reproductions)
        ("SmolLM2-135M-Instruct-v2-k256-0-woft", "SmolLM2-135M-Instruct", 0.135, "SmolLM 2",
         2, 256, 0, 4.0),
        ("Llama-2-7b-hf-v6-k4096-0-woft", "Llama-2-7b-hf", 7, "Llama 2", 6, 4096, 0, 2.0),
        ("Mistral-7B-Instruct-v0.3-v8-k65536-0-woft", "Mistral-7B-Instruct-v0.3", 7, "Mistral",
         8, 65536, 0, 2.0),
    ],
)  # fmt: skip
def test_names_parse_into_schemes(name, base, params, family, v, k, kr, bits):
    s = parse_name(f"VPTQ-community/{name}")
    assert (s.base, s.params_b, s.family, s.v, s.k, s.kr) == (base, params, family, v, k, kr)
    assert s.bits == pytest.approx(bits)


def test_name_without_scheme():
    s = parse_name("VPTQ-community/README-notes")
    assert s.bits is None and s.describe() == "scheme unknown"


def test_config_gives_the_scheme_and_the_exact_parameter_count():
    cfg = {  # Mistral-Large-Instruct-2407
        "hidden_size": 12288, "num_hidden_layers": 88, "num_attention_heads": 96,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 28672,
        "vocab_size": 32768, "max_position_embeddings": 131072,
        "quantization_config": {"quant_method": "vptq", "config_for_layers": {
            "model.layers.0.mlp.down_proj": {"vector_lens": [-1, 8], "num_centroids": [-1, 65536],
                                             "num_res_centroids": [-1, 256]}}},
    }  # fmt: skip
    s = scheme_from_config("VPTQ-community/Mistral-Large-Instruct-2407-v8-k65536-65536-woft", cfg)
    assert (s.v, s.k, s.kr) == (8, 65536, 256)  # the config wins over the name
    # 88 x (12288*14336 + 12288*12288 + 3*12288*28672 + 2*12288) + 12288 + 2*32768*12288
    assert s.params_b == 122.6


LLAMA_8B_SHAPE = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
}  # fmt: skip


@pytest.mark.parametrize(
    "layer,want",
    [
        # the config's own scheme over the name's; -1 residual centroids: no residual
        ({"vector_lens": [-1, 12], "num_centroids": [-1, 4096], "num_res_centroids": [-1, -1]},
         (12, 4096, 0)),
        # fields the layer's entry lacks keep the name's
        ({"num_res_centroids": [-1, 65536]}, (8, 65536, 65536)),
        ({"vector_lens": [-1, 16]}, (16, 65536, 256)),
    ],
)  # fmt: skip
def test_a_vptq_config_corrects_the_name_field_by_field(layer, want):
    name = "VPTQ-community/Meta-Llama-3.1-8B-Instruct-v8-k65536-256-woft"
    for q in (
        {"quant_method": "vptq", "config_for_layers": {"model.layers.0.mlp.up_proj": layer}},
        {"quant_method": "vptq", "shared_layer_config": layer},  # one entry for every layer
    ):
        s = scheme_from_config(name, LLAMA_8B_SHAPE | {"quantization_config": q})
        assert (s.v, s.k, s.kr, s.params_b) == (*want, 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 5, 16, "4"])
def test_a_gptq_configs_width_counts_only_where_the_engine_runs_it(bits):
    q = {"quant_method": "gptq", "bits": bits, "group_size": 128}
    s = scheme_from_config("TheBloke/Llama-GPTQ", LLAMA_8B_SHAPE | {"quantization_config": q})
    runs = bits in (2, 3, 4, 8)
    assert (s.gptq, s.bits, s.gptq_group) == (True, bits if runs else None, 128)
    assert s.describe() == (f"GPTQ, {bits} bits/weight" if runs else "GPTQ")


# -- catalogue -------------------------------------------------------------------------------------
def test_catalogue_lists_sorts_searches_pages_and_caches(hub, tmp_path):
    hub.add(Repo("VPTQ-community/Qwen2.5-7B-Instruct-v8-k65536-0-woft", {}, 500, "2026-03-01"))
    hub.add(Repo("VPTQ-community/Meta-Llama-3.1-8B-Instruct-v8-k65536-256-woft", {}, 900,
                 "2026-02-01"))  # fmt: skip
    hub.add(Repo("someone-else/Llama-v8-k256-0", {}, 10_000))
    hub.page_size = 2  # the client must follow the Link header
    h = make_hub(hub, tmp_path)
    entries, note = h.catalogue(sort="downloads")
    assert [e.downloads for e in entries] == [900, 500, 0]  # the other org is not listed
    assert note.startswith("3 models from http://127.0.0.1")
    assert len(hub.gets("/api/models")) == 2
    recent, _ = h.catalogue(sort="recent")
    assert recent[0].id.startswith("VPTQ-community/Qwen2.5-7B")
    found, _ = h.catalogue(search="llama")
    assert [e.id for e in found] == ["VPTQ-community/Meta-Llama-3.1-8B-Instruct-v8-k65536-256-woft"]

    offline = make_hub(hub, tmp_path, offline=True)
    hub.requests.clear()
    cached, note = offline.catalogue(search="qwen")
    assert [e.id for e in cached] == ["VPTQ-community/Qwen2.5-7B-Instruct-v8-k65536-0-woft"]
    assert note.startswith("offline mode: the list cached on") and not hub.requests
    down = Hub(HubSettings(endpoint="http://127.0.0.1:9"), tmp_path / "hub-cache")
    cached, note = down.catalogue()
    assert len(cached) == 3 and "could not be reached" in note
    # a damaged cache file is no cached list (the window asks the hub), never an exception
    good = (tmp_path / "hub-cache" / "catalogue.json").read_bytes()
    assert len(down.cached_catalogue()[0]) == 3
    raw = json.loads(good)
    for bad in (b"\xff{", b"[]", b'{"models": 1, "time": 0}',
                json.dumps({"models": raw["models"]}).encode(),  # no time
                json.dumps({**raw, "time": "noon"}).encode()):  # fmt: skip
        (tmp_path / "hub-cache" / "catalogue.json").write_bytes(bad)
        assert down.cached_catalogue() is None, bad
    (tmp_path / "hub-cache" / "catalogue.json").write_bytes(good)  # searched and sorted here too
    assert [e.downloads for e in down.cached_catalogue(sort="downloads")[0]] == [900, 500, 0]
    newest = down.cached_catalogue(search="VPTQ", sort="recent")[0]
    assert [e.id.split("/")[1][:4] for e in newest] == ["Qwen", "Meta", "Tiny"]


def test_config_is_cached_per_revision_and_a_damaged_cache_is_fetched_again(hub, tmp_path):
    h = make_hub(hub, tmp_path)
    sha = hub.repos[REPO].sha
    assert h.config(REPO, sha) == {"hidden_size": 64}
    asked = len(hub.gets("config.json"))
    assert h.config(REPO, sha) == {"hidden_size": 64} and len(hub.gets("config.json")) == asked
    [cache] = (tmp_path / "hub-cache" / "configs").rglob("*.json")
    for bad in (b"\xff", b"[1]"):
        cache.write_bytes(bad)
        assert h.config(REPO, sha) == {"hidden_size": 64}
    assert len(hub.gets("config.json")) == asked + 2
    hub.add(tiny_repo("VPTQ-community/odd"))
    hub.repos["VPTQ-community/odd"].files["config.json"] = b"[1, 2]"
    with pytest.raises(HubError, match=r"odd: its config\.json is not a JSON object"):
        h.config("VPTQ-community/odd", hub.repos["VPTQ-community/odd"].sha)
    del hub.repos["VPTQ-community/odd"].files["config.json"]  # a repo of other files
    with pytest.raises(HubError, match=r"^VPTQ-community/odd: it has no config\.json on the hub$"):
        h.config("VPTQ-community/odd", "0" * 40)
    down = Hub(HubSettings(endpoint="http://127.0.0.1:9"), tmp_path / "empty-cache")
    with pytest.raises(HubError, match=r"^VPTQ-community/odd: could not read config\.json \(.+\)$"):
        down.config("VPTQ-community/odd", "0" * 40)


def test_no_catalogue_offline_without_cache(hub, tmp_path):
    with pytest.raises(HubError, match="offline mode, and none is cached yet; turn Offline off"):
        make_hub(hub, tmp_path, offline=True).catalogue()
    down = Hub(HubSettings(endpoint="http://127.0.0.1:9"), tmp_path / "empty-cache")
    fix = r"could not be reached .*; check the network, or the mirror"
    with pytest.raises(HubError, match=fix):
        down.catalogue()


def test_file_sizes_checksums_and_bytes_on_disk(hub, tmp_path):
    files = make_hub(hub, tmp_path).files(REPO)
    assert files.revision == hub.repos[REPO].sha
    assert files.total == 500_000 + len(b'{"version": "1.0"}') + len(
        json.dumps({"hidden_size": 64})
    )
    assert files.weight_bytes == 500_000
    shard = next(f for f in files.files if f.path.startswith("model-00001"))
    assert shard.sha256 == hashlib.sha256(payload(300_000, 1)).hexdigest()
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(payload(300_000, 1))
    (folder / "model-00002-of-00002.safetensors.part").write_bytes(payload(1234, 2))
    assert bytes_on_disk(folder, files) == 300_000 + 1234
    hub.server.shutdown()  # offline: the cached list still answers
    assert make_hub(hub, tmp_path, offline=True).files(REPO).total == files.total


def test_a_gated_or_missing_repo_is_named_with_its_fix_not_answered_from_the_cache(hub, tmp_path):
    """A repo whose terms are not accepted (403) or that is gone (404) says so, even where its
    file list is cached from before: the download would fail, so the cache is no answer."""
    h = make_hub(hub, tmp_path)
    h.files(REPO)  # cached now
    hub.repos[REPO].gated = True
    with pytest.raises(HubError, match=r"access denied \(403\)\. The model may be gated"):
        h.files(REPO)
    del hub.repos[REPO]
    with pytest.raises(HubError, match=r"not found on the hub \(404\)\. It may have been renamed"):
        h.files(REPO)


def test_token_is_checked_and_kept_in_huggingface_hubs_store(hub, tmp_path):
    from huggingface_hub import constants

    hub.token = "hf_secret"
    with pytest.raises(HubError, match=r"access denied \(401\).*set a token"):
        make_hub(hub, tmp_path).files(REPO)
    with pytest.raises(HubError, match="rejected the token"):
        save_token("hf_wrong", hub.url)
    assert save_token("hf_secret", hub.url) == "tester"
    assert token() == "hf_secret" and Path(constants.HF_TOKEN_PATH).read_text() == "hf_secret"
    assert oct(os.stat(constants.HF_TOKEN_PATH).st_mode & 0o777) == "0o600"
    os.chmod(constants.HF_TOKEN_PATH, 0o644)  # a token file another tool left readable
    save_token("hf_secret", hub.url)
    assert oct(os.stat(constants.HF_TOKEN_PATH).st_mode & 0o777) == "0o600"
    assert make_hub(hub, tmp_path).files(REPO).total > 500_000
    assert make_hub(hub, tmp_path).config(REPO, hub.repos[REPO].sha) == {"hidden_size": 64}
    d, _ = run_download(hub, tmp_path)
    assert d.state == "installed"
    (tmp_path / "a-file").write_text("")
    elsewhere = tmp_path / "a-file" / "token"  # a folder that cannot be made
    with (
        patch.object(constants, "HF_TOKEN_PATH", str(elsewhere)),
        pytest.raises(
            HubError, match=f"Could not store the token in {elsewhere}: File exists. Make"
        ),
    ):
        save_token("hf_secret", hub.url)


# -- downloads -------------------------------------------------------------------------------------
def test_clean_download_is_verified_and_installed(hub, tmp_path):
    d, states = run_download(hub, tmp_path)
    assert d.state == "installed", d.message
    assert states[0] == "checking" and "verifying" in states and states[-1] == "installed"
    assert d.done == sum(len(b) for b in hub.repos[REPO].files.values())
    assert_installed(hub, tmp_path)
    [m] = local_models(tmp_path / "models")
    assert m.installed and m.repo == REPO and m.disk_bytes >= d.total


SHARD = "model-00001-of-00002.safetensors"


@pytest.mark.parametrize("fault", ["stall", "drop", "wrong_size", "corrupt", "trickle"])
def test_transient_faults_end_in_a_verified_install(hub, tmp_path, fault):
    hub.fail(REPO, SHARD, fault)
    d, states = run_download(hub, tmp_path)
    assert d.state == "installed", (d.message, states)
    assert_installed(hub, tmp_path)
    gets = hub.gets(f"/resolve/{hub.repos[REPO].sha}/{SHARD}")
    assert len(gets) == (1 if fault == "trickle" else 2)
    if fault in ("stall", "drop"):  # the second request resumes where the first stopped
        start = int(gets[1][2].removeprefix("bytes=").removesuffix("-"))
        assert 150_000 - CHUNK < start <= 150_000  # at most one chunk in flight was lost
    for waited in ("stalled", "retrying"):  # bytes again: shown as downloading again
        if waited in states:
            assert states[states.index(waited) + 1] == "downloading", states
    if fault == "stall":
        assert "stalled" in states
        assert STALL_SPEEDS and STALL_SPEEDS[-1] == 0.0  # an honest speed: nothing arrives
    if fault in ("wrong_size", "corrupt"):  # the bad data was thrown away, then fetched whole
        assert gets[1][2] is None and "retrying" in states


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("wrong_size", "Gave up after 3 retries"),
        ("corrupt", "checksum mismatch"),
        ("401", "access denied \\(401\\)"),
        ("403", "access denied \\(403\\)"),
        ("404", "not found on the hub \\(404\\)"),
    ],
)
def test_persistent_faults_stop_with_a_message_and_nothing_installed(hub, tmp_path, fault, message):
    hub.fail(REPO, SHARD, *[fault] * 10)
    d, _ = run_download(hub, tmp_path)
    assert d.state == "failed"
    import re

    assert re.search(message, d.message), d.message
    assert_not_installed(tmp_path)
    folder = tmp_path / "models" / REPO
    assert (folder / "config.json").exists()  # files before the failing one are kept
    assert not (folder / SHARD).exists()
    assert [m.installed for m in local_models(tmp_path / "models")] == [False]
    # the first try and max_retries (3) more where a retry could help; one try where not
    gets = hub.gets(f"/resolve/{hub.repos[REPO].sha}/{SHARD}")
    assert len(gets) == (4 if fault in ("wrong_size", "corrupt") else 1), gets


async def _pause_mid_file(m, d):
    while d.done < 10_000:
        await asyncio.sleep(0.01)
    m.pause(d.repo)
    await m.wait(d.repo)
    assert d.state == "paused"


def test_pause_keeps_the_part_and_resume_continues_with_range(hub, tmp_path):
    hub.fail(REPO, SHARD, "trickle")
    d, _ = run_download(hub, tmp_path, before=_pause_mid_file)
    part = tmp_path / "models" / REPO / (SHARD + ".part")
    assert d.state == "paused" and 0 < part.stat().st_size < 300_000
    kept = part.stat().st_size
    # damaged manifests of other downloads are passed over, not the end of the restore
    for name, data in (("list", b"[1, 2]"), ("bytes", b"\xff\xfe{"), ("shape", b'{"files": 3}')):
        (tmp_path / "models" / "Org" / name).mkdir(parents=True)
        (tmp_path / "models" / "Org" / name / MANIFEST).write_bytes(data)

    async def resume():
        m = manager(hub, tmp_path)
        [old] = m.restore()  # after an app restart it is listed as paused with its bytes
        assert old.state == "paused" and old.done >= kept
        m.resume(REPO)
        d = await m.wait(REPO)
        m.close()
        return d

    d = asyncio.run(resume())
    assert d.state == "installed", d.message
    assert d.done == d.total  # the kept part counted once, from where it was
    assert_installed(hub, tmp_path)
    assert hub.gets(SHARD)[-1][2] == f"bytes={kept}-"


def test_start_and_pause_leave_running_and_finished_downloads_as_they_are(hub, tmp_path):
    """Start on a running download returns it (no second worker), and on an installed one
    fetches nothing again; pause touches only a running one; a manifest left beside an installed
    model (an exit between the two writes) does not bring it back as a download."""
    hub.fail(REPO, SHARD, "trickle")

    async def twice(m, d):
        while d.state != "downloading":
            await asyncio.sleep(0.01)
        task = d.task
        assert m.start(REPO) is d and d.task is task and d.state == "downloading"
        m.pause("Nobody/unknown")  # not a download: nothing happens

    d, states = run_download(hub, tmp_path, before=twice)
    assert d.state == "installed" and states.count("checking") == 1
    folder = tmp_path / "models" / REPO
    files = json.loads((folder / INSTALLED).read_text())
    (folder / MANIFEST).write_text(json.dumps({"files": files, "state": "downloading"}))
    gets = len(hub.gets(SHARD))

    async def later():
        m = manager(hub, tmp_path)
        assert m.restore() == []
        again = m.start(REPO)
        assert again.state == "checking"  # not known to this manager: checked, then installed
        await m.wait(REPO)
        assert again.state == "installed"
        assert m.start(REPO) is again and again.task.done()  # nothing launched
        m.pause(REPO)
        assert again.state == "installed"
        m.close()

    asyncio.run(later())
    assert len(hub.gets(SHARD)) == gets  # the installed files were not fetched again
    assert_installed(hub, tmp_path)


def test_a_complete_part_is_verified_without_a_request_and_an_oversized_one_fetched_again(
    hub, tmp_path
):
    """Parts left by an earlier run: one that holds the whole file (the app stopped between its
    last byte and its check) is checked and moved into place with no request; one longer than
    the file cannot be ours and is fetched again from its first byte, the progress not counting
    its extra bytes."""
    files = hub.repos[REPO].files
    other = "model-00002-of-00002.safetensors"
    folder = tmp_path / "models" / REPO
    folder.mkdir(parents=True)
    (folder / (SHARD + ".part")).write_bytes(files[SHARD])
    (folder / (other + ".part")).write_bytes(files[other] + b"extra bytes")
    d, _ = run_download(hub, tmp_path)
    assert d.state == "installed", d.message
    assert_installed(hub, tmp_path)
    sha = hub.repos[REPO].sha
    assert hub.gets(f"/resolve/{sha}/{SHARD}") == []
    [get] = hub.gets(f"/resolve/{sha}/{other}")
    assert get[2] is None  # no Range: from the first byte
    assert d.done == d.total == sum(len(b) for b in files.values())


def test_a_server_that_ignores_range_restarts_the_file(hub, tmp_path):
    hub.fail(REPO, SHARD, "trickle", "ignore_range")
    run_download(hub, tmp_path, before=_pause_mid_file)

    async def resume():
        m = manager(hub, tmp_path)
        m.restore()
        m.resume(REPO)
        d = await m.wait(REPO)
        m.close()
        return d

    d = asyncio.run(resume())
    assert d.state == "installed", d.message
    assert d.done == d.total  # the progress did not count the first part twice
    assert_installed(hub, tmp_path)


def test_interrupted_app_resumes_on_restart(hub, tmp_path):
    """An app that exits mid-download (state 'downloading' on disk) resumes by itself."""
    hub.fail(REPO, SHARD, "trickle")

    async def interrupted(m, d):
        while d.done < 10_000:
            await asyncio.sleep(0.01)
        m.close()  # app exit: workers stop, parts stay
        await asyncio.wait([d.task])

    run_download(hub, tmp_path, before=interrupted)
    assert_not_installed(tmp_path)

    async def restart():
        m = manager(hub, tmp_path)
        [d] = m.restore()
        assert d.state == "checking"  # resumed without being asked
        d = await m.wait(REPO)
        m.close()
        return d

    assert asyncio.run(restart()).state == "installed"
    assert_installed(hub, tmp_path)


def test_cancel_deletes_the_partial_download(hub, tmp_path):
    hub.fail(REPO, SHARD, "trickle")

    async def cancel(m, d):
        while d.done < 10_000:
            await asyncio.sleep(0.01)
        await m.cancel(d.repo)

    d, _ = run_download(hub, tmp_path, before=cancel)
    assert d.state == "cancelled"
    assert not (tmp_path / "models" / REPO).exists()


def test_not_enough_disk_space_stops_before_downloading(hub, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    d, _ = run_download(hub, tmp_path)
    assert d.state == "failed" and "Not enough disk space" in d.message and "resume" in d.message
    assert not hub.gets("/resolve/")


def test_delete_removes_an_installed_model(hub, tmp_path):
    run_download(hub, tmp_path)

    async def delete():
        m = manager(hub, tmp_path)
        await m.delete(REPO)

    asyncio.run(delete())
    assert not (tmp_path / "models" / REPO).exists() and local_models(tmp_path / "models") == []


def test_offline_download_of_an_unknown_repo_says_why(hub, tmp_path):
    async def main():
        hub_off = make_hub(hub, tmp_path, offline=True)
        m = DownloadManager(hub_off, tmp_path / "models")
        m.start(REPO)
        d = await m.wait(REPO)
        m.close()
        return d

    d = asyncio.run(main())
    assert d.state == "failed" and "offline mode" in d.message


# -- any Hub repo by name: GPTQ checkpoints --------------------------------------------------------
@pytest.mark.parametrize(
    ("repo", "base", "params", "family", "bits"),
    [
        ("hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4", "Meta-Llama-3.1-8B-Instruct", 8,
         "Llama 3.1", 4),
        ("Qwen/Qwen2.5-72B-Instruct-GPTQ-Int8", "Qwen2.5-72B-Instruct", 72, "Qwen 2.5", 8),
        ("BitDistiller/Qwen2.5-7B-w2g64-gptq", "Qwen2.5-7B-w2g64", 7, "Qwen 2.5", 2),
        ("someone/Mistral-7B-gptq-3bit", "Mistral-7B", 7, "Mistral", 3),
        ("TheBloke/Llama-2-7B-GPTQ", "Llama-2-7B", 7, "Llama 2", None),  # width not in the name
    ],
)  # fmt: skip
def test_gptq_names_parse(repo, base, params, family, bits):
    s = parse_name(repo)
    assert (s.gptq, s.base, s.params_b, s.family, s.bits) == (True, base, params, family, bits)
    assert (s.v, s.k, s.kr) == (None, None, None)
    assert s.describe() == (f"GPTQ, {bits} bits/weight" if bits else "GPTQ")


def test_a_gptq_config_gives_its_width_and_the_parameter_count():
    cfg = {  # Llama-3.1-8B's shape; the name says nothing of the size or the width
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
        "quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": 128},
    }  # fmt: skip
    s = scheme_from_config("TheBloke/Llama-GPTQ", cfg)
    assert (s.gptq, s.bits, s.describe()) == (True, 3, "GPTQ, 3 bits/weight")
    # 32 x (2*4096*4096 + 2*4096*1024 + 3*4096*14336 + 2*4096) + 4096 + 2*128256*4096 = 8.03e9
    assert s.params_b == 8.0


def test_owner_slash_words_lists_that_owners_repos(hub, tmp_path):
    hub.add(Repo("VPTQ-community/Qwen2.5-7B-Instruct-v8-k65536-0-woft", {}, 500))
    hub.add(Repo("hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4", {}, 300))
    hub.add(Repo("hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4", {}, 200))
    hub.add(Repo("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", {}, 900))
    h = make_hub(hub, tmp_path)
    h.catalogue()  # the community list, cached
    found, note = h.catalogue(search="hugging-quants/")
    assert [e.id for e in found] == [
        "hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4",
        "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4",
    ]
    assert note.startswith("2 models from http://127.0.0.1")
    found, _ = h.catalogue(search=" hugging-quants/gptq ")
    assert [e.id for e in found] == ["hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4"]
    assert found[0].scheme.describe() == "GPTQ, 4 bits/weight"
    found, _ = h.catalogue(search="gptq")  # plain words: the community's models only
    assert found == []
    assert len(h.cached_catalogue()[0]) == 2  # searches never replace the cached list


def test_weights_the_engine_cannot_read_are_not_fetched_beside_safetensors(hub, tmp_path):
    both = tiny_repo("someone/Both-GPTQ")
    both.files |= {"pytorch_model.bin": b"x" * 1000, "model.gguf": b"y" * 10, "README.md": b"z"}
    hub.add(both)
    hub.add(Repo("someone/Old-GPTQ", {"config.json": b"{}", "pytorch_model.bin": b"x" * 10}))
    h = make_hub(hub, tmp_path)
    got = {f.path for f in h.files("someone/Both-GPTQ").files}
    assert got == set(tiny_repo().files) | {"README.md"}
    # no safetensors at all: the list stays whole (the engine then names what it lacks)
    assert {f.path for f in h.files("someone/Old-GPTQ").files} == {
        "config.json",
        "pytorch_model.bin",
    }


def test_a_disk_that_fills_up_mid_download_fails_at_once_and_keeps_the_part(
    hub, tmp_path, monkeypatch
):
    import errno

    real_open = Path.open

    class FillsUp:
        """A .part file on a disk with 20 000 bytes left."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            if self.f.tell() + len(data) > 20_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(self, mode="r", *a, **k):
        f = real_open(self, mode, *a, **k)
        return FillsUp(f) if self.name.endswith(".part") and "a" in mode else f

    monkeypatch.setattr(Path, "open", open_)
    d, states = run_download(hub, tmp_path)
    assert d.state == "failed" and d.retries == 0 and "retrying" not in states, states
    part = next((tmp_path / "models" / REPO).rglob("*.part"))
    assert d.message == (
        f"Cannot write {part.with_suffix('')}: No space left on device. Free some space (or fix "
        "the folder's permissions), then resume; the downloaded part is kept."
    )
    assert 0 < part.stat().st_size <= 20_000  # what was written stays for the resume


def test_the_catalogue_shows_and_filters_sizes_the_names_give_in_millions_or_not_at_all(qapp):
    """SmolLM2-135M showed "?" and no size filter kept it; Mistral-Large-Instruct-2407 (no size
    in its name) the same: both now have their sizes, in the list and for the filter."""
    from app.browser import CatalogueFilter, CatalogueModel, Filters
    from app.hub import Entry

    model, proxy = CatalogueModel(), CatalogueFilter()
    proxy.setSourceModel(model)
    names = ["SmolLM2-135M-Instruct-v2-k256-0-woft", "Qwen2.5-0.5B-Instruct-v8-k65536-0-woft",
             "Mistral-Large-Instruct-2407-v8-k65536-256-woft"]  # fmt: skip
    model.set_entries([Entry(f"VPTQ-community/{n}") for n in names])
    assert [model.index(r, 1).data() for r in range(3)] == ["135M", "0.5B", "123B"]

    def shown(max_params: float) -> list[str]:
        proxy.set_filters(Filters(max_params=max_params))
        return [proxy.index(r, 0).data().split("-")[0] for r in range(proxy.rowCount())]

    assert shown(8) == ["SmolLM2", "Qwen2.5"]
    assert shown(72) == ["SmolLM2", "Qwen2.5"]
    assert shown(0) == ["SmolLM2", "Qwen2.5", "Mistral"]


@pytest.mark.parametrize(
    "filters,want",
    [
        (dict(), ["Llama-8B-v8", "Llama-8B-v12", "Qwen-72B-v16", "GPTQ"]),
        (dict(family="Qwen 2.5"), ["Qwen-72B-v16"]),
        (dict(max_params=8), ["Llama-8B-v8", "Llama-8B-v12", "GPTQ"]),
        (dict(max_params=7.9), []),  # the sizes to the billion: 8 is not within 7.9
        (dict(max_bits=2), ["Qwen-72B-v16"]),  # 28 / 12 = 2.33 bits is out...
        (dict(max_bits=28 / 12), ["Llama-8B-v12", "Qwen-72B-v16"]),  # ... and in at its own
        (dict(max_bits=3), ["Llama-8B-v8", "Llama-8B-v12", "Qwen-72B-v16", "GPTQ"]),
        (dict(v=12), ["Llama-8B-v12"]),
        (dict(k=65536), ["Llama-8B-v8", "Llama-8B-v12", "Qwen-72B-v16"]),
        (dict(kr=0), ["Qwen-72B-v16"]),
        (dict(kr=256), ["Llama-8B-v8"]),
        (dict(family="Llama 3.1", v=8, k=65536, kr=256, max_bits=3, max_params=8),
         ["Llama-8B-v8"]),
    ],
)  # fmt: skip
def test_every_scheme_filter_keeps_exactly_the_rows_that_match(qapp, filters, want):
    from app.browser import CatalogueFilter, CatalogueModel, Filters
    from app.hub import Entry

    named = {
        "Llama-8B-v8": "VPTQ-community/Meta-Llama-3.1-8B-Instruct-v8-k65536-256-woft",  # 3 bits
        "Llama-8B-v12": "VPTQ-community/Meta-Llama-3.1-8B-Instruct-v12-k65536-4096-woft",
        "Qwen-72B-v16": "VPTQ-community/Qwen2.5-72B-Instruct-v16-k65536-0-woft",  # 1 bit
        "GPTQ": "TheBloke/Llama-3.1-8B-Instruct-GPTQ-INT3",  # 3 bits, no v, k or residual
    }
    model, proxy = CatalogueModel(), CatalogueFilter()
    proxy.setSourceModel(model)
    model.set_entries([Entry(repo) for repo in named.values()])
    proxy.set_filters(Filters(**filters))
    by_repo = {repo.rsplit("/")[-1]: label for label, repo in named.items()}
    shown = [by_repo[proxy.index(r, 0).data()] for r in range(proxy.rowCount())]
    assert shown == want


def test_sizes_and_times_left_read_in_the_unit_a_person_expects():
    from app.browser import eta_text, size_text

    sizes = (0, 999, 999.6, 1000, 1550, 999_949, 999_960, 999_999, 2.5e9, 7e12, 3e15)
    assert [size_text(n) for n in sizes] == [
        "0 B", "999 B", "1.0 KB", "1.0 KB", "1.6 KB", "999.9 KB", "1.0 MB", "1.0 MB", "2.5 GB",
        "7.0 TB", "3000.0 TB",
    ]  # fmt: skip
    assert [eta_text(t) for t in (None, 0, 89, 90, 5399, 5400, 6300)] == [
        "–", "0 s", "89 s", "2 min", "90 min", "1.5 h", "1.8 h"
    ]  # fmt: skip


def test_a_downloads_fraction_and_time_left_follow_its_bytes_and_speed(tmp_path):
    from app.downloads import Download
    from app.hub import RemoteFile, RepoFiles

    d = Download("o/m", tmp_path)
    assert (d.total, d.fraction, d.eta) == (0, 0.0, None)  # its files not listed yet
    d.files = RepoFiles("o/m", "main", [RemoteFile("a", 300), RemoteFile("b.safetensors", 700)])
    d.done, d.speed = 250, 50.0
    assert (d.total, d.fraction, d.eta) == (1000, 0.25, 15.0)
    d.speed = 0.5  # slow is not stalled
    assert d.eta == 1500.0
    d.speed = 0.0  # a stall: no time left to tell
    assert d.eta is None


def test_download_speed_is_the_bytes_of_the_window_over_its_time_to_now():
    """Hand arithmetic: samples at 1, 2, 3 s of 100, 400, 600 bytes done, now 3.5 s, a 2.5 s
    window: all three are in it (the one at its edge too), 500 bytes over 2.5 s."""
    from app.downloads import speed

    samples = [(0.0, 0), (1.0, 100), (2.0, 400), (3.0, 600)]
    assert speed(samples, 3.0, 3.5, 2.5) == 200.0
    assert speed(samples, 3.0, 4.0, 2.5) == 100.0  # 1.0 out: (600 - 400) / (4 - 2)
    assert speed(samples, 3.0, 4.5, 2.5) == 80.0  # (600 - 400) / (4.5 - 2)
    assert speed(samples, 3.0, 5.1, 2.5) == 0.0  # one sample left in the window, bytes 2.1 s ago
    assert speed(samples, 1.0, 3.5, 2.5) == 0.0  # no byte for the whole window: a stall
    assert speed(samples, 1.01, 3.5, 2.5) == 200.0
    assert speed([(5.0, 0), (5.0, 10)], 5.0, 5.0, 1.0) == 10_000.0  # no time yet: 1 ms


def test_a_file_is_checked_by_sha256_by_git_blob_id_or_by_size(tmp_path):
    from app.downloads import _verified
    from app.hub import RemoteFile

    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    sha256 = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    blob = "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object of the same bytes
    assert _verified(path, RemoteFile("f", 6, sha256=sha256))
    assert not _verified(path, RemoteFile("f", 6, sha256=sha256.replace("5", "6", 1)))
    assert _verified(path, RemoteFile("f", 6, oid=blob))
    assert not _verified(path, RemoteFile("f", 6, oid=blob[::-1]))
    assert _verified(path, RemoteFile("f", 6))  # neither: the size alone
    assert not _verified(path, RemoteFile("f", 7))


def test_a_downloaded_model_is_named_by_its_repo_id(tmp_path, monkeypatch):
    from app.hub import model_label

    monkeypatch.setenv("VPTQ_CHAT_MODELS", str(tmp_path / "models"))
    folder = tmp_path / "models" / "VPTQ-community" / "Qwen2.5-7B-Instruct-v8-k65536-0-woft"
    assert model_label(str(folder)) == "VPTQ-community/Qwen2.5-7B-Instruct-v8-k65536-0-woft"
    assert model_label("demo") == "demo"
    assert model_label(str(tmp_path / "elsewhere" / "my-model")) == str(
        tmp_path / "elsewhere" / "my-model"
    )  # a folder of the user's own: as given
    assert model_label(str(folder / "sub")) == str(folder / "sub")
    assert model_label(None) == "the model"


def test_retries_wait_twice_as_long_each_time_and_say_how_long(hub, tmp_path):
    """A file failing on a transient error is retried max_retries times, after backoff, 2x
    backoff, 4x backoff seconds, each wait shown ("retry 2 of 3 in 4 s"); then it gives up,
    keeping the part. A stop during a wait ends the retries there."""
    import threading
    from types import SimpleNamespace

    from app.downloads import Download

    m = manager(hub, tmp_path, backoff=2.0, max_retries=3)
    m._post = lambda fn, *args: fn(*args)  # state changes on this thread, in order
    shown = []
    m.on_change = lambda d: shown.append((d.state, d.message))
    waits = []

    class Waits(threading.Event):  # no real waiting: the delays are recorded
        def wait(self, timeout=None):
            waits.append(timeout)
            return len(waits) == stop_at

    def fails(d, f):
        raise ConnectionResetError("Connection reset by peer")

    m._file = fails
    f = SimpleNamespace(path="model.safetensors")
    stop_at = 0
    d = Download("o/m", tmp_path / "o" / "m", stop=Waits())
    assert m._file_with_retries(d, f) is False
    assert waits == [2.0, 4.0, 8.0]
    why = "ConnectionResetError: Connection reset by peer"
    assert shown == [
        ("retrying", f"retry 1 of 3 in 2 s: {why}"),
        ("retrying", f"retry 2 of 3 in 4 s: {why}"),
        ("retrying", f"retry 3 of 3 in 8 s: {why}"),
        ("failed", f"model.safetensors: {why}. Gave up after 3 retries; the downloaded part is "
                   "kept: resume to continue."),
    ]  # fmt: skip
    waits.clear()
    stop_at = 2  # paused during the second wait
    d = Download("o/m", tmp_path / "o" / "m", stop=Waits())
    assert m._file_with_retries(d, f) is False and waits == [2.0, 4.0] and d.retries == 2


def test_a_repo_id_maps_to_its_folder_under_the_models_folder(tmp_path):
    from app.hub import folder_of

    assert folder_of(tmp_path, "VPTQ-community/m") == tmp_path / "VPTQ-community" / "m"


@pytest.mark.parametrize(
    "repo", ["plain", "owner/", "/name", "a/b/c", "../name", "./name", "owner/..", "owner/."]
)
def test_anything_else_is_refused_as_a_repo_id(tmp_path, repo):
    """No name, a deeper path, a parent or current folder on either side: refused naming it,
    so no download writes outside models/owner/name."""
    from app.hub import folder_of

    with pytest.raises(HubError, match=f"'{repo}' is not a repo id of the form owner/name"):
        folder_of(tmp_path, repo)


def test_a_model_folder_with_both_markers_is_listed_once_as_installed(tmp_path):
    """A download that finished but left its manifest (or an old one beside a new install) is
    one model, installed; a folder with only the manifest is a partial download."""
    done = tmp_path / "o" / "done"
    part = tmp_path / "o" / "part"
    for folder in (done, part):
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text("{}")
    (done / INSTALLED).write_text("{}")
    (done / "w.safetensors").write_bytes(b"x" * 100)
    got = [(m.repo, m.installed) for m in local_models(tmp_path)]
    assert got == [("o/done", True), ("o/part", False)]


def test_bits_per_weight_need_a_vector_length_and_a_codebook():
    from app.hub import Scheme

    assert Scheme("M", None, 8, 65536, None).bits == 2.0  # no residual field: none
    assert Scheme("M", None, 8, 65536, 256).bits == 3.0
    assert Scheme("M", None, 8, 65536, 1).bits == 2.0  # one residual centroid: no bits
    assert Scheme("M", None, 8, 0, 0).bits is None and Scheme("M", None, 0, 256, 0).bits is None
    assert Scheme("M", None, None, 256, 0).describe() == "scheme unknown"
