"""On-the-fly analysis at the microscope: send each new frame of a folder to the segmentation endpoint.

    tgan watch /data/session42 --endpoint http://gpu-box:8000 --out live/
    watch_folder("/data/session42", "http://127.0.0.1:8000", "live/", max_files=10)

The folder is polled (robust on network shares, where file-system events often never arrive). A file is sent
once it is fully written: its size and mtime are the same on two polls in a row, and temporary names
(``*.tmp``, ``*.part``, ``.hidden``, ``~``) are ignored until they are renamed. Each frame is sent exactly once:

- ``sent.json``, a ledger of every frame sent (or rejected by the endpoint), survives restarts;
- ``particles.csv`` gets the frame's particles appended; the ledger records the CSV length after each frame,
  so a crash between the two is repaired on restart (rows without a ledger entry are cut, then resent);
- ``running_summary.json`` (count, mean diameter, its drift per frame and per minute, and each frame's mean
  diameter with its 95% bootstrap interval), ``psd.png``, ``mean_diameter.png`` (the per-frame means with their
  intervals: sintering drift shows) and ``particles.parquet`` are rewritten after each poll that brought new
  frames.

While the endpoint is down or overloaded (connection errors, timeouts, HTTP 408, 425, 429, 500, 502, 503, 504),
frames wait in order and are retried with capped exponential backoff: none is lost. An overloaded server's
``Retry-After`` (seconds or an HTTP date, as Serve sends with its 503) is honoured: the next attempt waits at least
that long, up to the cap. A frame the endpoint refuses (other 4xx and 5xx: not an image,
too large) is recorded as rejected with its reason and not retried.

The HTTP side (URL, upload, which failures are retried) is in :mod:`tgan_ray.watch_client`, the output folder
(ledger, CSV, summary, plots) in :mod:`tgan_ray.watch_outputs`; this module polls the folder and runs the loop.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tgan_ray.io.decoders import SUPPORTED_EXTENSIONS
from tgan_ray.watch_client import FrameRejected, RetryLater, post_frame, segment_url
from tgan_ray.watch_outputs import WatchOutputs

__all__ = ["WatchResult", "watch_folder"]

_log = logging.getLogger("tgan_ray.watch")

# Names that writers (microscope software, rsync, browsers, editors) use for files still being written.
_TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".filepart", ".swp", "~")


@dataclass
class WatchResult:
    """What one bounded run of :func:`watch_folder` did.

    Attributes:
        sent: files segmented in this run, in the order sent.
        rejected: files the endpoint refused (4xx), with the reason.
        pending: files seen but not sent when the run ended (still being written, or the endpoint was down).
        retries: failed attempts that were retried (endpoint down, timeout, a retryable HTTP status).
        elapsed_s: wall time of the run.
        out_dir: where particles.csv / .parquet, psd.png, mean_diameter.png, running_summary.json and sent.json are.
    """

    sent: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    retries: int = 0
    elapsed_s: float = 0.0
    out_dir: str = ""


def _is_candidate(name: str) -> bool:
    low = name.lower()
    if name.startswith((".", "~")) or low.endswith(_TEMP_SUFFIXES):
        return False
    return os.path.splitext(low)[1] in SUPPORTED_EXTENSIONS


class _Watcher:
    """The poll loop's state: which files are settling, when the next attempt may go, what this run did."""

    def __init__(self, root: Path, session: WatchOutputs, url: str, settle_s: float, recursive: bool, say):
        self.root, self.session, self.url, self.settle_s, self.recursive, self.say = (
            root,
            session,
            url,
            settle_s,
            recursive,
            say,
        )
        self.out_resolved = session.out.resolve()
        self.seen: dict[str, tuple[int, int, float]] = {}  # rel -> (size, mtime_ns, first poll in this state)
        self.next_attempt = 0.0
        self.backoff = 0.0
        self.result = WatchResult(out_dir=str(session.out))

    def _files(self):
        for path in self.root.rglob("*") if self.recursive else self.root.iterdir():
            try:
                if not _is_candidate(path.name) or not path.is_file():
                    continue
                if self.recursive and self.out_resolved in path.resolve().parents:
                    continue
                yield path.relative_to(self.root).as_posix(), path, path.stat()
            except OSError:  # vanished or unreadable between listing and stat: the next poll decides
                continue

    def scan(self) -> list[tuple[float, str, Path]]:
        """One poll: files not yet done, and which of them are fully written (oldest first)."""
        now = time.monotonic()
        current: dict[str, tuple[int, int, float]] = {}
        ready = []
        for rel, path, st in self._files():
            if self.session.is_done(rel, st.st_size, st.st_mtime_ns):
                continue
            state = (st.st_size, st.st_mtime_ns)
            before = self.seen.get(rel)
            unchanged = before is not None and before[:2] == state
            current[rel] = (*state, before[2] if unchanged else now)
            # Fully written: non-empty, and the same size and mtime on two polls at least settle_s apart.
            if st.st_size > 0 and unchanged and now - before[2] >= self.settle_s:
                ready.append((st.st_mtime, rel, path))
        self.seen = current
        return sorted(ready)

    def send(
        self, client, rel: str, path: Path, pixel_size_nm: float | None, retry: tuple[float, float]
    ) -> bool:
        """Send one ready file; False when the endpoint is unavailable (the caller stops this round)."""
        try:
            st = path.stat()
            data = path.read_bytes()
        except OSError:
            return True
        if len(data) != st.st_size or (st.st_size, st.st_mtime_ns) != self.seen[rel][:2]:
            return True  # it changed after all: it has to settle again
        try:
            response = post_frame(client, self.url, path, rel, data, pixel_size_nm)
        except RetryLater as exc:
            self.backoff = min(max(self.backoff * 2, retry[0]), retry[1])
            wait, why = self.backoff, ""
            if exc.after_s is not None and exc.after_s > wait:  # the server knows best, within our cap
                wait, why = min(exc.after_s, retry[1]), " (the server's Retry-After)"
            self.next_attempt = time.monotonic() + wait
            self.result.retries += 1
            self.say(f"endpoint unavailable ({exc}); retrying {rel} in {wait:.1f} s{why}")
            return False
        except FrameRejected as exc:
            self.session.reject(rel, st, str(exc))
            self.result.rejected[rel] = str(exc)
            self.say(f"rejected {rel}: {exc}")
            return True
        self.backoff = 0.0
        entry = self.session.record(rel, st, response)
        self.result.sent.append(rel)
        mean = entry["mean_diameter"]
        self.say(
            f"frame {entry['frame_index']}: {rel}: {entry['count']} particles, "
            f"mean diameter {'-' if mean is None else f'{mean:.3g}'} {entry['unit'] or ''}"
        )
        return True


def watch_folder(
    folder: str | os.PathLike,
    endpoint: str,
    out_dir: str | os.PathLike | None = None,
    interval: float = 1.0,
    max_files: int | None = None,
    stop_after_s: float | None = None,
    pixel_size_nm: float | None = None,
    recursive: bool = False,
    settle_s: float | None = None,
    timeout_s: float = 120.0,
    retry_initial_s: float = 0.5,
    retry_max_s: float = 30.0,
    log: Callable[[str], None] | None = None,
) -> WatchResult:
    """Watch ``folder`` and segment each new, fully written image file once, through ``endpoint``.

    Args:
        folder: the microscope's output folder.
        endpoint: the service's base URL (``http://host:8000``) or its full ``/v1/segment`` URL.
        out_dir: where the live outputs go (default ``<folder>/tgan-watch``; never scanned for images).
        interval: seconds between polls.
        max_files: return after this many files were sent or rejected in this run (None: no bound).
        stop_after_s: return after this many seconds (None: run until Ctrl-C).
        pixel_size_nm: nm per pixel sent with each frame (None: the file's calibration or the server's config).
        recursive: also watch subfolders.
        settle_s: how long a file must keep its size and mtime before it is sent, timed by this machine's clock
            (so a share's clock skew does not matter); two polls at least (None: ``interval``).
        timeout_s: HTTP timeout of one request.
        retry_initial_s: first wait after a failed attempt; it doubles on each further failure...
        retry_max_s: ...up to this cap.
        log: progress messages (default: the module logger).

    Returns:
        A :class:`WatchResult` for this run.
    """
    import httpx

    say = log or _log.info
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"watch folder not found: {root}")
    url = segment_url(endpoint)
    session = WatchOutputs(Path(out_dir) if out_dir is not None else root / "tgan-watch")
    watcher = _Watcher(root, session, url, interval if settle_s is None else settle_s, recursive, say)
    result = watcher.result
    start = time.monotonic()
    say(f"watching {root} -> {url}; outputs in {session.out} ({len(session.frames)} frames already done)")

    def done() -> bool:
        out_of_time = stop_after_s is not None and time.monotonic() - start >= stop_after_s
        return out_of_time or (max_files is not None and len(result.sent) + len(result.rejected) >= max_files)

    with httpx.Client(timeout=timeout_s) as client:
        while not done():
            ready = watcher.scan()
            sent_before = len(result.sent)
            if ready and time.monotonic() >= watcher.next_attempt:
                for _, rel, path in ready:
                    # On failure stop the round: keeping the order, nothing goes before the frame that waits.
                    if done() or not watcher.send(
                        client, rel, path, pixel_size_nm, (retry_initial_s, retry_max_s)
                    ):
                        break
            if len(result.sent) > sent_before:
                session.write_summary()
            if done():
                break
            wake = (
                interval if stop_after_s is None else min(interval, stop_after_s - (time.monotonic() - start))
            )
            time.sleep(max(0.0, wake))
    result.pending = sorted(
        rel for rel, (size, mtime_ns, _) in watcher.seen.items() if not session.is_done(rel, size, mtime_ns)
    )
    result.elapsed_s = time.monotonic() - start
    return result
