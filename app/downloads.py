"""The download manager: one model at a time per worker thread, huggingface_hub's ``http_get``
underneath, progress posted to the asyncio (Qt) loop by a tqdm subclass. No Qt inside.

Each file goes to ``<name>.part`` (kept on pause, failure and app exit, so the next try resumes
with an HTTP Range) and is renamed into place only after its checksum matched: sha256 for LFS
files, the git blob id for the others. The model folder gets hub.INSTALLED only when every file
is in place, so nothing half-done is ever "installed". A watchdog on the loop turns a transfer
without bytes into the visible state "stalled"; failed transfers are retried a bounded number
of times; then the download stops with the reason and keeps its data for a later resume.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .hub import (
    INSTALLED,
    MANIFEST,
    Hub,
    HubError,
    RepoFiles,
    _http_message,
    _status,
    bytes_on_disk,
    folder_of,
)
from .threads import DaemonThreads

log = logging.getLogger("app.downloads")

DISK_MARGIN = 256 << 20  # keep this much free beyond the download itself
ACTIVE = ("checking", "downloading", "stalled", "retrying", "verifying")


class Stop(Exception):
    """Raised inside the transfer (from the progress bar) to pause or cancel it."""


@dataclass
class Download:
    repo: str
    folder: Path
    files: RepoFiles | None = None
    state: str = "queued"  # queued checking downloading stalled retrying verifying
    #                        paused failed cancelled installed
    message: str = ""
    done: int = 0  # bytes on disk, complete and partial
    speed: float = 0.0  # bytes/s over the last few seconds; 0 on a stall
    retries: int = 0
    file_index: int = 0
    file_done: int = 0  # bytes of the current file
    file_size: int = 0
    last_bytes: float = field(default_factory=time.monotonic)
    samples: deque = field(default_factory=lambda: deque(maxlen=64))
    stop: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Future | None = None

    @property
    def total(self) -> int:
        return self.files.total if self.files else 0

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def eta(self) -> float | None:
        if self.speed <= 0 or not self.total:
            return None
        return (self.total - self.done) / self.speed

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class DownloadManager:
    """Owns every download; ``on_change(download)`` is called on the loop after each change."""

    def __init__(
        self,
        hub: Hub,
        models_dir: Path,
        on_change: Callable[[Download], None] = lambda d: None,
        stall_after: float = 15.0,
        read_timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 2.0,
        speed_window: float = 3.0,
        chunk_size: int = 1 << 20,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        from huggingface_hub import constants

        constants.HF_HUB_DOWNLOAD_TIMEOUT = read_timeout  # a silent socket raises after this
        # progress (and what a dropped connection can lose) comes in chunks of this size
        constants.DOWNLOAD_CHUNK_SIZE = chunk_size
        self.hub, self.models_dir, self.on_change = hub, models_dir, on_change
        self.stall_after, self.max_retries, self.backoff = stall_after, max_retries, backoff
        self.speed_window = speed_window
        self.downloads: dict[str, Download] = {}
        self.pool = DaemonThreads(max_workers=2, name="download")  # never holds the app's exit
        self.loop = loop  # None: the loop running when the first download starts
        self._ticker: asyncio.Task | None = None

    # -- public API (call on the loop) -------------------------------------------------------------
    def restore(self) -> list[Download]:
        """Downloads left by an earlier run: shown as paused, resumed where they were active."""
        resumed = []
        for manifest in sorted(self.models_dir.glob(f"*/*/{MANIFEST}")):
            try:
                raw = json.loads(manifest.read_text())
                files = RepoFiles.from_json(raw["files"])
            except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: JSON, UTF-8
                log.warning("%s: unreadable (%s); ignored", manifest, e)
                continue
            if (manifest.parent / INSTALLED).exists() or files.repo in self.downloads:
                continue
            d = Download(files.repo, manifest.parent, files, "paused", "resume to continue")
            d.done = bytes_on_disk(d.folder, files)
            self.downloads[d.repo] = d
            if raw.get("state") in ACTIVE:
                resumed.append(d)
        for d in resumed:
            self.resume(d.repo)
        return list(self.downloads.values())

    def start(self, repo: str) -> Download:
        d = self.downloads.get(repo)
        if d and (d.active or d.state == "installed"):
            return d
        d = d or Download(repo, folder_of(self.models_dir, repo))
        self.downloads[repo] = d
        self._launch(d)
        return d

    def resume(self, repo: str) -> Download:
        return self.start(repo)

    def pause(self, repo: str) -> None:
        d = self.downloads.get(repo)
        if d and d.active:
            d.stop.set()
            self._set(d, "paused", "resume to continue; the downloaded part is kept")

    async def cancel(self, repo: str) -> None:
        """Stop and delete the partial download (an installed model is left alone)."""
        d = self.downloads.get(repo)
        if d is None:
            return
        d.stop.set()
        if d.task:
            await asyncio.wait([d.task])
        if not (d.folder / INSTALLED).exists():
            shutil.rmtree(d.folder, ignore_errors=True)
            _prune(d.folder.parent, self.models_dir)
        self._set(d, "cancelled", "cancelled; the partial files were deleted")

    async def delete(self, repo: str) -> None:
        """Remove a model folder (installed or partial)."""
        d = self.downloads.pop(repo, None)
        if d is not None:
            d.stop.set()
            if d.task:
                await asyncio.wait([d.task])
        folder = folder_of(self.models_dir, repo)
        shutil.rmtree(folder, ignore_errors=True)
        _prune(folder.parent, self.models_dir)

    async def wait(self, repo: str) -> Download:
        d = self.downloads[repo]
        while d.task is not None and not d.task.done():
            await asyncio.wait([d.task])
        return d

    def close(self) -> None:
        """Stop every transfer (their parts stay for the next run) without waiting."""
        for d in self.downloads.values():
            d.stop.set()
        if self._ticker:
            self._ticker.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- the loop side -----------------------------------------------------------------------------
    def _launch(self, d: Download) -> None:
        self.loop = self.loop or asyncio.get_running_loop()
        if self._ticker is None or self._ticker.done():
            self._ticker = self.loop.create_task(self._tick())
        previous = d.task
        self._set(d, "checking", "reading the file list")
        d.task = self.loop.create_task(self._run(d, previous))

    async def _run(self, d: Download, previous: asyncio.Future | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # the old worker must let go of the .part files
        if d.state != "checking":
            return  # paused or cancelled meanwhile
        d.stop = threading.Event()  # the worker's own: a later resume makes a new one
        d.retries = 0
        try:
            await self.loop.run_in_executor(self.pool, self._work, d)
        except Stop:
            pass
        except Exception as e:  # unexpected: say it, keep the data
            log.exception("download of %s failed", d.repo)
            self._set(d, "failed", f"{type(e).__name__}: {e}")
        if d.files is not None and (d.folder / MANIFEST).exists():
            self._manifest(d, d.state)  # paused or failed stays so after a restart

    def _set(self, d: Download, state: str, message: str = "") -> None:
        d.state, d.message = state, message
        if state == "downloading":
            d.last_bytes = time.monotonic()
        self.on_change(d)

    def _post(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def _report(self, d: Download, state: str, message: str = "") -> None:
        """A state change from the worker; dropped once the user paused or cancelled."""
        stop = d.stop
        self._post(lambda: None if stop.is_set() else self._set(d, state, message))

    def _bytes(self, d: Download, n: int) -> None:
        now = time.monotonic()
        d.done += n
        d.file_done += n
        d.samples.append((now, d.done))
        if n > 0:
            d.last_bytes = now
            if d.state in ("stalled", "retrying", "checking") and not d.stop.is_set():
                d.state, d.message = "downloading", ""
        self.on_change(d)

    async def _tick(self) -> None:
        """Speed over the window (0 when no byte arrived in it) and the stall watchdog."""
        while True:
            await asyncio.sleep(min(0.5, self.stall_after / 2))
            now = time.monotonic()
            for d in list(self.downloads.values()):
                if d.state not in ("downloading", "stalled"):
                    continue
                d.speed = speed(d.samples, d.last_bytes, now, self.speed_window)
                idle = now - d.last_bytes
                if d.state == "downloading" and idle > self.stall_after:
                    d.state = "stalled"
                if d.state == "stalled":
                    d.message = f"no data for {idle:.0f} s; reconnecting"
                self.on_change(d)

    # -- the worker thread -------------------------------------------------------------------------
    def _work(self, d: Download) -> None:
        try:
            files = self.hub.files(d.repo)
        except HubError as e:
            if d.files is None:
                self._report(d, "failed", str(e))
                return
            files = d.files  # offline or unreachable: go on with the saved list
        if d.files and d.files.revision != files.revision:
            log.info("%s changed on the hub (%s -> %s)", d.repo, d.files.revision, files.revision)
        d.files = files
        d.folder.mkdir(parents=True, exist_ok=True)
        self._manifest(d, "downloading")
        done = bytes_on_disk(d.folder, files)
        self._post(self._reset_done, d, done)
        need = files.total - done + DISK_MARGIN
        free = shutil.disk_usage(d.folder).free
        if free < need:
            self._report(
                d,
                "failed",
                f"Not enough disk space in {d.folder}: {_gb(need)} needed, {_gb(free)} free. "
                "Free some space (Models > Installed lists what you have), then resume.",
            )
            return
        self._report(d, "downloading")
        for i, f in enumerate(files.files):
            d.file_index = i
            if not self._file_with_retries(d, f):
                return
        (d.folder / INSTALLED).write_text(json.dumps(files.to_json()))
        (d.folder / MANIFEST).unlink(missing_ok=True)
        self._report(d, "installed", f"installed in {d.folder}")

    def _file_started(self, d: Download, have: int, size: int) -> None:
        d.file_done, d.file_size = have, size

    def _reset_done(self, d: Download, done: int) -> None:
        d.done = done
        d.samples.clear()
        self.on_change(d)

    def _manifest(self, d: Download, state: str) -> None:
        data = {"files": d.files.to_json(), "state": state}
        (d.folder / MANIFEST).write_text(json.dumps(data))

    def _file_with_retries(self, d: Download, f) -> bool:
        """One file to completion, retrying transient failures. False: stopped or failed."""
        while True:
            if d.stop.is_set():
                return False
            try:
                self._file(d, f)
                return True
            except Stop:
                return False
            except HubError as e:  # not worth retrying
                self._report(d, "failed", f"{e} The downloaded part is kept.")
                return False
            except Exception as e:
                if isinstance(e, OSError) and e.errno in LOCAL_WRITE_ERRORS:  # retrying won't help
                    self._report(
                        d,
                        "failed",
                        f"Cannot write {d.folder / f.path}: {e.strerror}. Free some space (or "
                        "fix the folder's permissions), then resume; the downloaded part is kept.",
                    )
                    return False
                if _status(e) in (401, 403, 404):
                    msg = _http_message(e, f"{d.repo}/{f.path}")
                    self._report(d, "failed", f"{msg} The downloaded part is kept.")
                    return False
                d.retries += 1
                if d.retries > self.max_retries:
                    self._report(
                        d,
                        "failed",
                        f"{f.path}: {_describe(e)}. Gave up after {self.max_retries} retries; "
                        "the downloaded part is kept: resume to continue.",
                    )
                    return False
                wait = self.backoff * 2 ** (d.retries - 1)
                self._post(
                    self._set,
                    d,
                    "retrying",
                    f"retry {d.retries} of {self.max_retries} in {wait:.0f} s: {_describe(e)}",
                )
                if d.stop.wait(wait):
                    return False

    def _file(self, d: Download, f) -> None:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        from .hub import token

        path = d.folder / f.path
        if path.is_file() and path.stat().st_size == f.size:
            return  # verified before it was moved into place
        part = path.with_name(path.name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        counted = min(have, f.size)  # what bytes_on_disk counted of it
        self._post(self._file_started, d, counted, f.size)
        if have > f.size:  # cannot be ours: start the file again
            part.unlink()
            self._post(self._bytes, d, -counted)
            have = 0
        url = hf_hub_url(d.repo, f.path, revision=d.files.revision, endpoint=self.hub.settings.url)
        headers = build_hf_headers(token=token() or False)
        if have < f.size:
            with part.open("ab") as out:
                try:
                    http_get(
                        url,
                        out,
                        resume_size=have,
                        headers=headers,
                        expected_size=f.size,
                        displayed_filename=f.path,
                        tqdm_class=self._bar(d, have),
                    )
                except OSError as e:
                    if "Consistency check failed" in str(e):  # the server sent the wrong size
                        out.close()
                        self._post(self._bytes, d, -part.stat().st_size)
                        part.unlink()
                        raise SizeMismatch(f"the hub sent a different size than {f.size}") from e
                    raise
        self._report(d, "verifying", f"checking {f.path}")
        if not _verified(part, f):
            self._post(self._bytes, d, -part.stat().st_size)
            part.unlink()
            raise ChecksumMismatch(f"{f.path}: checksum mismatch (the data was corrupted)")
        part.replace(path)
        self._report(d, "downloading")

    def _bar(self, d: Download, have: int) -> type:
        manager = self

        class Bar(tqdm):
            """Posts every chunk to the loop; raises Stop inside the transfer on pause."""

            def __init__(self, *args, **kwargs):
                kwargs.pop("name", None)
                kwargs["disable"] = True  # a windowed app has no terminal
                super().__init__(*args, **kwargs)
                # a server that ignored our Range restarts the file: initial drops to 0
                manager._post(manager._bytes, d, int(kwargs.get("initial") or 0) - have)

            def update(self, n=1):
                if d.stop.is_set():
                    raise Stop()
                manager._post(manager._bytes, d, int(n))

        return Bar


def speed(samples, last_bytes: float, now: float, window: float) -> float:
    """Bytes a second over the last ``window`` seconds, from (time, bytes done) samples: the
    bytes the samples in the window add, over the time from the first of them to now (a pause
    in the flow lowers it at once); 0 where no byte came within the window or only one sample
    is in it."""
    recent = [(t, b) for t, b in samples if t >= now - window]
    if len(recent) < 2 or now - last_bytes >= window:
        return 0.0
    return (recent[-1][1] - recent[0][1]) / max(now - recent[0][0], 1e-3)


class SizeMismatch(Exception):
    pass


class ChecksumMismatch(Exception):
    pass


def _verified(path: Path, f) -> bool:
    if f.sha256:
        h = hashlib.sha256()
    elif f.oid:
        h = hashlib.sha1()
        h.update(f"blob {path.stat().st_size}\0".encode())
    else:
        return path.stat().st_size == f.size
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest() == (f.sha256 or f.oid)


# Errors of our own disk, not of the connection: a retry fails the same way.
LOCAL_WRITE_ERRORS = {
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM")
    if hasattr(errno, name)
}


def _describe(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _gb(n: int) -> str:
    return f"{n / (1 << 30):.2f} GB"


def _prune(folder: Path, root: Path) -> None:
    """Remove an empty owner folder left behind."""
    if folder != root and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
