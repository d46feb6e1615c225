"""The VPTQ-community catalogue and the model files on the Hugging Face Hub; no Qt inside.

Everything here blocks (network, disk): the GUI calls it through ``asyncio.to_thread``. Model
folders live under ``models_dir/<org>/<name>``; downloads.py fills them. A folder is a usable
model only once it holds the INSTALLED marker, written after every file was verified.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.paths import INSTALLED_MARKER, hub_models

log = logging.getLogger("app.hub")

ORG = "VPTQ-community"
INSTALLED = INSTALLED_MARKER  # written last: the model is complete and verified
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what counts as the weights of a repo or folder
MANIFEST = ".vptq-download.json"  # the revision and file list being downloaded
_SCHEME = re.compile(r"-v(\d+)-k(\d+)-(\d+)(?=-|$)")
_PARAMS = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)([BbMm])(?![a-zA-Z])")  # 8B, 0.5B, 135M
# Published bases whose names give no size (vptq-format.md section 6.1), in billions
NAMED_SIZES = {"Mistral-Large-Instruct-": 123.0}
_GPTQ = re.compile(r"[-_.]?gptq", re.I)  # GPTQ checkpoints of any publisher ("...-GPTQ-Int4")
_GPTQ_BITS = re.compile(r"(?:int|w)([2348])(?!\d)|(?<!\d)([2348])[-_]?bits?(?![a-z])", re.I)
# Weight formats the engine does not read; a repo that also has safetensors is fetched without
# them (some publish the same weights two or three times over).
UNREAD_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5", ".ot", ".tflite")


class HubError(Exception):
    """A failure a user can act on; the message says what and what to do."""


@dataclass(frozen=True)
class Scheme:
    """What a VPTQ-community name (or config) says about a model."""

    base: str
    params_b: float | None  # billions of parameters
    v: int | None  # vector length
    k: int | None  # centroids of the main codebook
    kr: int | None  # residual centroids (0: none)
    gptq: bool = False  # a GPTQ checkpoint (v, k, kr None)
    gptq_bits: int | None = None
    gptq_group: int | None = None  # from the config (-1: one group)

    @property
    def bits(self) -> float | None:
        """Index bits per weight (the codebooks add a little on top); GPTQ's code width."""
        if self.gptq:
            return self.gptq_bits
        if not self.v or not self.k:
            return None
        res = math.log2(self.kr) if self.kr and self.kr > 1 else 0.0
        return (math.log2(self.k) + res) / self.v

    @property
    def family(self) -> str:
        """'Llama 3.1', 'Qwen2.5', 'Mistral', ...: the base model's family for filtering."""
        name = self.base.removeprefix("Meta-")
        # the number after the name is a version ("Llama-3.1"), not a size ("Mistral-7B")
        m = re.match(r"([A-Za-z]+)[- ]?(\d+(?:\.\d+)?(?![\d.]*[Bb](?![a-z])))?", name)
        if not m:
            return name
        return f"{m.group(1)} {m.group(2)}".strip() if m.group(2) else m.group(1)

    def describe(self) -> str:
        if self.gptq:
            return f"GPTQ, {self.gptq_bits} bits/weight" if self.gptq_bits else "GPTQ"
        if self.bits is None:
            return "scheme unknown"
        res = f" + residual {self.kr}" if self.kr else ""
        return f"{self.bits:.2f} bits/weight: vectors of {self.v}, {self.k} centroids{res}"


def parse_name(repo_id: str) -> Scheme:
    name = repo_id.rsplit("/", 1)[-1]
    g = _GPTQ.search(name)
    if g:  # e.g. Meta-Llama-3.1-8B-Instruct-GPTQ-INT4: the width from the name where it says
        base = name[: g.start()]
        b = _GPTQ_BITS.search(name)
        bits = int(b.group(1) or b.group(2)) if b else None
        return Scheme(base, _named_params(base), None, None, None, True, bits)
    m = _SCHEME.search(name)
    base = name[: m.start()] if m else name
    params = _named_params(base)
    if not m:
        return Scheme(base, params, None, None, None)
    return Scheme(base, params, int(m.group(1)), int(m.group(2)), int(m.group(3)))


def _size_in_name(base: str) -> float | None:
    """Billions of parameters as the base model's name says ("8B", "135M"); None if it does
    not say."""
    p = _PARAMS.search(base)
    return float(p.group(1)) / (1000 if p.group(2) in "Mm" else 1) if p else None


def _named_params(base: str) -> float | None:
    """The size the name says, else the known size of a published base whose name does not
    say (NAMED_SIZES); None if neither."""
    size = _size_in_name(base)
    if size is not None:
        return size
    return next((b for prefix, b in NAMED_SIZES.items() if base.startswith(prefix)), None)


def scheme_from_config(repo_id: str, config: dict) -> Scheme:
    """The name's scheme, corrected by the config's quantization_config and with the exact
    parameter count where the name lacks one (a size from NAMED_SIZES gives way to it)."""
    s = parse_name(repo_id)
    named = _size_in_name(s.base)
    q = config.get("quantization_config") or {}
    if isinstance(q, dict) and (q.get("quant_method") or q.get("method")) == "gptq":
        bits = q.get("bits") if q.get("bits") in (2, 3, 4, 8) else None
        group = q.get("group_size") if isinstance(q.get("group_size"), int) else None
        return Scheme(s.base, _params(named, config), None, None, None, True, bits, group)
    layers = q.get("config_for_layers") or {}
    first = next(iter(layers.values()), None) or q.get("shared_layer_config") or {}
    v = (first.get("vector_lens") or [None, s.v])[-1]
    k = (first.get("num_centroids") or [None, s.k])[-1]
    kr = (first.get("num_res_centroids") or [None, s.kr])[-1]
    return Scheme(s.base, _params(named, config), v, k, max(kr, 0) if kr is not None else None)


def _params(named: float | None, config: dict) -> float | None:
    """Billions of parameters: the name's, else counted from the config's shape."""
    from .fit import Shape

    if named is not None:
        return named
    try:
        tied = bool(config.get("tie_word_embeddings"))
        return round(Shape.from_config(config).parameters(tied) / 1e9, 1)
    except ValueError:
        return None


def model_label(model: str | None) -> str:
    """How the app names a model it loads: a downloaded one by its repo id (its folder's path
    under the models folder filled the status bar), anything else as given (demo, a folder)."""
    if not model:
        return "the model"
    try:
        rel = Path(model).resolve().relative_to(hub_models().resolve())
    except (ValueError, OSError):
        return model
    return rel.as_posix() if len(rel.parts) == 2 else model


def catalogue_query(search: str) -> tuple[str, str | None]:
    """(author, search) for the hub's model list: the community organisation's models, or,
    where the search reads ``owner/part``, that owner's (any Hub repo by name, GPTQ ones
    among them)."""
    owner, slash, rest = search.strip().partition("/")
    if slash and owner and "/" not in rest:
        return owner, rest or None
    return ORG, search.strip() or None


@dataclass
class Entry:
    """One catalogue row."""

    id: str
    downloads: int = 0
    likes: int = 0
    modified: str = ""  # ISO time of the last change

    @property
    def scheme(self) -> Scheme:
        return parse_name(self.id)


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None  # LFS files
    oid: str | None = None  # git blob id (sha1 of "blob <size>\0" + bytes)


@dataclass
class RepoFiles:
    repo: str
    revision: str
    files: list[RemoteFile] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def weight_bytes(self) -> int:
        return sum(f.size for f in self.files if f.path.endswith(WEIGHT_SUFFIXES))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RepoFiles:
        return cls(d["repo"], d["revision"], [RemoteFile(**f) for f in d["files"]])


REACH_TIMEOUT = 10.0  # seconds the hub has to answer the catalogue's first request


@dataclass
class HubSettings:
    endpoint: str = ""  # a mirror (HF_ENDPOINT); empty: huggingface.co
    proxy: str = ""  # http(s) proxy URL
    offline: bool = False

    @property
    def url(self) -> str:
        return (self.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip(
            "/"
        )


def folder_of(models_dir: Path, repo: str) -> Path:
    org, _, name = repo.partition("/")
    if not name or "/" in name or org in ("", ".", "..") or name in (".", ".."):
        raise HubError(f"{repo!r} is not a repo id of the form owner/name")
    return models_dir / org / name


class Hub:
    """The catalogue (cached on disk for offline use), file lists and configs."""

    def __init__(self, settings: HubSettings, cache_dir: Path) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self.apply()

    def apply(self) -> None:
        """Point huggingface_hub at the proxy; takes effect for new connections."""
        from huggingface_hub import close_session

        for var in ("HTTPS_PROXY", "HTTP_PROXY"):
            if self.settings.proxy:
                os.environ[var] = self.settings.proxy
            else:
                os.environ.pop(var, None)
        close_session()

    def api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.settings.url, token=token() or False)

    # -- catalogue ---------------------------------------------------------------------------------
    def catalogue(self, search: str = "", sort: str = "downloads") -> tuple[list[Entry], str]:
        """The organisation's models and a note on where they came from. Offline or on a network
        error, the cached list (filtered here) with the reason."""
        if not self.settings.offline:
            try:
                entries = self._fetch(search, sort)
                if not search:
                    _write_json(
                        self._catalogue_file,
                        {"time": time.time(), "models": [asdict(e) for e in entries]},
                    )
                n = len(entries)
                return entries, f"{n} model{'' if n == 1 else 's'} from {self.settings.url}"
            except Exception as e:
                reason = f"the hub could not be reached ({_short(e)})"
        else:
            reason = "offline mode"
        cached = self.cached_catalogue(search, sort)
        if cached is None:
            fix = (
                "turn Offline off in Hub settings"
                if self.settings.offline
                else "check the network, or the mirror and proxy in Hub settings"
            )
            raise HubError(f"No model list: {reason}, and none is cached yet; {fix}.")
        entries, when = cached
        return entries, f"{reason}: the list cached on {when}"

    @property
    def _catalogue_file(self) -> Path:
        return self.cache_dir / "catalogue.json"

    def cached_catalogue(self, search: str = "", sort: str = "downloads"):
        """(entries, when it was cached) from the list last fetched, searched and sorted here;
        None where none is cached. Reads a file only: quick enough for the GUI's thread."""
        try:
            raw = json.loads(self._catalogue_file.read_text())
            entries = [Entry(**m) for m in raw["models"]]
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(raw["time"]))
        except (OSError, ValueError, KeyError, TypeError, OverflowError):  # none usable
            return None
        entries = [e for e in entries if search.lower() in e.id.lower()]
        key = (lambda e: e.downloads) if sort == "downloads" else (lambda e: e.modified)
        entries.sort(key=key, reverse=True)
        return entries, when

    def _fetch(self, search: str, sort: str) -> list[Entry]:
        # list_models retries a dead connection five times, for about half a minute (its
        # http_backoff, fixed there): one plain request first says at once that the hub cannot
        # be reached (a refused connection, an unknown host, no answer in REACH_TIMEOUT).
        from huggingface_hub import get_session

        get_session().head(self.settings.url, timeout=REACH_TIMEOUT)  # any answer will do
        author, part = catalogue_query(search)
        models = self.api().list_models(
            author=author,
            search=part,
            sort="downloads" if sort == "downloads" else "last_modified",
            expand=["downloads", "likes", "lastModified"],
        )
        out = []
        for m in models:
            modified = m.last_modified.isoformat() if m.last_modified else ""
            out.append(Entry(m.id, m.downloads or 0, m.likes or 0, modified))
        return out

    # -- one repo ----------------------------------------------------------------------------------
    def files(self, repo: str) -> RepoFiles:
        """The repo's files with exact sizes and checksums (cached for offline use)."""
        cache = self.cache_dir / "repos" / (repo.replace("/", "--") + ".json")
        if self.settings.offline:
            return self._cached_files(cache, repo, "offline mode")
        try:
            info = self.api().model_info(repo, files_metadata=True)
        except Exception as e:
            if _status(e) in (401, 403, 404):
                raise HubError(_http_message(e, repo)) from None
            return self._cached_files(cache, repo, f"the hub could not be reached ({_short(e)})")
        files = [
            RemoteFile(
                s.rfilename,
                int(s.lfs.size if s.lfs else s.size or 0),
                s.lfs.sha256 if s.lfs else None,
                s.blob_id,
            )
            for s in info.siblings or []
        ]
        if any(f.path.endswith(".safetensors") for f in files):
            files = [f for f in files if not f.path.endswith(UNREAD_WEIGHTS)]
        out = RepoFiles(repo, info.sha or "main", files)
        _write_json(cache, out.to_json())
        return out

    def _cached_files(self, cache: Path, repo: str, reason: str) -> RepoFiles:
        try:
            return RepoFiles.from_json(json.loads(cache.read_text()))
        except (OSError, ValueError, KeyError, TypeError):  # ValueError: not JSON, not UTF-8
            raise HubError(f"{repo}: {reason}, and its file list is not cached.") from None

    def config(self, repo: str, revision: str) -> dict:
        """config.json of one revision (cached: a revision never changes)."""
        cache = self.cache_dir / "configs" / repo.replace("/", "--") / f"{revision}.json"
        try:
            config = json.loads(cache.read_text())
            if isinstance(config, dict):
                return config
        except (OSError, ValueError):  # not there, not JSON, not UTF-8: fetched again
            pass
        if self.settings.offline:
            raise HubError(f"{repo}: offline mode, and its config.json is not cached.")
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(repo, "config.json", revision=revision, endpoint=self.settings.url)
        try:
            r = get_session().get(url, headers=build_hf_headers(token=token() or False))
            r.raise_for_status()
            cfg = r.json()
        except Exception as e:
            if _status(e) == 404:  # a repo of other files (GGUF, adapters): no model config
                raise HubError(f"{repo}: it has no config.json on the hub") from None
            raise HubError(f"{repo}: could not read config.json ({_short(e)})") from None
        if not isinstance(cfg, dict):
            raise HubError(f"{repo}: its config.json is not a JSON object; ask its publisher")
        _write_json(cache, cfg)
        return cfg


# -- the token, in huggingface_hub's own store -----------------------------------------------------
def token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def save_token(value: str, endpoint: str | None = None) -> str:
    """Check the token with the hub (unless ``endpoint`` is None) and store it where
    huggingface_hub (and `hf auth login`) keep it. Returns the account name."""
    from huggingface_hub import HfApi, constants

    user = ""
    if endpoint is not None:
        try:
            user = HfApi(endpoint=endpoint).whoami(token=value).get("name", "")
        except Exception as e:
            raise HubError(f"The hub at {endpoint} rejected the token ({_short(e)}).") from None
    path = Path(constants.HF_TOKEN_PATH)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # created readable by the user alone: never, even for a moment, by everyone
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w") as f:
            f.write(value.strip())
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)  # a file that was there keeps its mode
    except OSError as e:
        raise HubError(
            f"Could not store the token in {path}: {e.strerror or e}. Make sure "
            f"{path.parent} is a folder you can write to (HF_HOME moves it)."
        ) from None
    return user


def clear_token() -> None:
    from huggingface_hub import constants

    Path(constants.HF_TOKEN_PATH).unlink(missing_ok=True)


# -- local state -----------------------------------------------------------------------------------
@dataclass
class LocalModel:
    repo: str
    folder: Path
    disk_bytes: int
    installed: bool


def local_models(models_dir: Path) -> list[LocalModel]:
    """Every model folder under models_dir: installed ones and partial downloads."""
    out = []
    for marker in sorted(
        [*models_dir.glob(f"*/*/{INSTALLED}"), *models_dir.glob(f"*/*/{MANIFEST}")]
    ):
        folder = marker.parent
        repo = f"{folder.parent.name}/{folder.name}"
        if any(m.repo == repo for m in out):
            continue
        installed = (folder / INSTALLED).exists()
        out.append(LocalModel(repo, folder, disk_usage(folder), installed))
    return out


def disk_usage(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bytes_on_disk(folder: Path, files: RepoFiles) -> int:
    """How much of ``files`` is already in ``folder``: complete files and partial ones."""
    done = 0
    for f in files.files:
        path = folder / f.path
        part = path.with_name(path.name + ".part")
        if path.is_file() and path.stat().st_size == f.size:
            done += f.size
        elif part.is_file():
            done += min(part.stat().st_size, f.size)
    return done


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _status(e: Exception) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _http_message(e: Exception, what: str) -> str:
    code = _status(e)
    if code in (401, 403):
        return (
            f"{what}: access denied ({code}). The model may be gated or private: accept its "
            "terms on the hub and set a token in Models > Hub settings."
        )
    if code == 404:
        return f"{what}: not found on the hub (404). It may have been renamed or removed."
    return f"{what}: {_short(e)}"
