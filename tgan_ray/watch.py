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

While the endpoint is down or overloaded (connection errors, timeouts, 5xx, 429), frames wait in order and are
retried with capped exponential backoff: none is lost. An overloaded server's ``Retry-After`` (seconds or an
HTTP date, as Serve sends with its 503) is honoured: the next attempt waits at least that long, up to the cap. A frame the endpoint refuses (4xx: not an image,
too large) is recorded as rejected with its reason and not retried.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd

from tgan_ray.analysis.particles import PARTICLE_COLUMNS
from tgan_ray.io.readers import SUPPORTED_EXTENSIONS

__all__ = ["WatchResult", "retry_after_s", "segment_url", "watch_folder"]

_log = logging.getLogger("tgan_ray.watch")

LEDGER = "sent.json"
PARTICLES_CSV = "particles.csv"
SUMMARY_JSON = "running_summary.json"
PSD_PNG = "psd.png"
SERIES_PNG = "mean_diameter.png"
PARTICLES_PARQUET = "particles.parquet"
FRAME_COLUMNS = ("frame_index", "file", "acquired_at")
# Names that writers (microscope software, rsync, browsers, editors) use for files still being written.
_TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".filepart", ".swp", "~")
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class WatchResult:
    """What one bounded run of :func:`watch_folder` did.

    Attributes:
        sent: files segmented in this run, in the order sent.
        rejected: files the endpoint refused (4xx), with the reason.
        pending: files seen but not sent when the run ended (still being written, or the endpoint was down).
        retries: failed attempts that were retried (endpoint down, timeout, 5xx).
        elapsed_s: wall time of the run.
        out_dir: where particles.csv / .parquet, psd.png, mean_diameter.png, running_summary.json and sent.json are.
    """

    sent: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    retries: int = 0
    elapsed_s: float = 0.0
    out_dir: str = ""


class _Retry(Exception):
    """The endpoint could not take the frame now; try again later (``after_s``: the server's Retry-After)."""

    def __init__(self, reason: str, after_s: float | None = None):
        super().__init__(reason)
        self.after_s = after_s


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` header (RFC 9110: delay-seconds or an HTTP date) as seconds from now; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _Rejected(Exception):
    """The endpoint refused the frame for good."""


def segment_url(endpoint: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1/segment``; a URL with a path is used as given."""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"endpoint {endpoint!r} is not an http(s) URL, e.g. http://127.0.0.1:8000")
    path = parts.path if parts.path not in ("", "/") else "/v1/segment"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _is_candidate(name: str) -> bool:
    low = name.lower()
    if name.startswith((".", "~")) or low.endswith(_TEMP_SUFFIXES):
        return False
    return os.path.splitext(low)[1] in SUPPORTED_EXTENSIONS


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Session:
    """Output folder state: the ledger, the particle table and the running summary."""

    def __init__(self, out_dir: Path):
        self.out = out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger_path = out_dir / LEDGER
        self.csv_path = out_dir / PARTICLES_CSV
        try:
            ledger = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}
        except ValueError:
            raise ValueError(
                f"{self.ledger_path} is not a valid watch ledger; move it away to send every frame again"
            ) from None
        self.frames: dict[str, dict[str, Any]] = ledger.get("frames", {})
        self.csv_bytes = int(ledger.get("csv_bytes", 0))
        self._repair_csv()
        self.table = self._load_table()

    def _repair_csv(self) -> None:
        # Rows written after the last ledger update belong to a frame the ledger does not know: cut them, the
        # frame is sent again. A CSV shorter than the ledger says cannot be repaired by cutting; keep it.
        if self.csv_path.is_file() and self.csv_path.stat().st_size > self.csv_bytes:
            with open(self.csv_path, "r+b") as f:
                f.truncate(self.csv_bytes)
            _log.warning("cut %s back to the last frame in %s", self.csv_path, self.ledger_path)

    def _load_table(self) -> pd.DataFrame:
        if self.csv_path.is_file() and self.csv_path.stat().st_size > 0:
            return pd.read_csv(self.csv_path)
        return pd.DataFrame(columns=[*FRAME_COLUMNS, *PARTICLE_COLUMNS])

    @property
    def next_index(self) -> int:
        return 1 + max((int(f.get("frame_index", -1)) for f in self.frames.values()), default=-1)

    def record(self, rel: str, stat: os.stat_result, response: dict[str, Any]) -> dict[str, Any]:
        """Append the frame's particles to the CSV, then the frame to the ledger (in that order: see repair)."""
        index = self.next_index
        acquired = datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat()
        rows = pd.DataFrame(response.get("particles") or [], columns=list(PARTICLE_COLUMNS))
        rows.insert(0, "acquired_at", acquired)
        rows.insert(0, "file", rel)
        rows.insert(0, "frame_index", index)
        new_file = not self.csv_path.is_file() or self.csv_path.stat().st_size == 0
        with open(self.csv_path, "a", newline="") as f:
            rows.to_csv(f, header=new_file, index=False)
            f.flush()
            os.fsync(f.fileno())
        self.csv_bytes = self.csv_path.stat().st_size
        if not rows.empty:
            self.table = rows if self.table.empty else pd.concat([self.table, rows], ignore_index=True)
        summary = response.get("summary") or {}
        entry = {
            "status": "sent",
            "frame_index": index,
            "size": stat.st_size,
            "mtime": stat.st_mtime,
            "mtime_ns": stat.st_mtime_ns,
            "acquired_at": acquired,
            "sent_at": datetime.now(timezone.utc).isoformat(),
            "count": summary.get("count"),
            "mean_diameter": summary.get("mean"),
            "mean_diameter_ci95": _mean_interval(rows, seed=index),
            "unit": summary.get("unit"),
            "pixel_size_nm": response.get("pixel_size_nm"),
            "model": response.get("model"),
        }
        self.frames[rel] = entry
        self.save_ledger()
        return entry

    def reject(self, rel: str, stat: os.stat_result, reason: str) -> None:
        self.frames[rel] = {
            "status": "rejected",
            "reason": reason,
            "size": stat.st_size,
            "mtime": stat.st_mtime,
            "mtime_ns": stat.st_mtime_ns,
        }
        self.save_ledger()

    def is_done(self, rel: str, size: int, mtime_ns: int) -> bool:
        """Sent, or rejected in exactly this state. A rejected file that changed since (a writer that paused
        longer than the settle time, then finished it) is tried again."""
        entry = self.frames.get(rel)
        if entry is None:
            return False
        if entry.get("status") == "sent":
            return True
        return (entry.get("size"), entry.get("mtime_ns")) == (size, mtime_ns)

    def save_ledger(self) -> None:
        _atomic_write_text(
            self.ledger_path, json.dumps({"csv_bytes": self.csv_bytes, "frames": self.frames}, indent=1)
        )

    def write_summary(self) -> dict[str, Any]:
        """Rewrite running_summary.json, psd.png, mean_diameter.png and particles.parquet from every particle
        so far."""
        from tgan_ray.analysis import plot_psd, psd_summary, write_particles_parquet, write_summary
        from tgan_ray.analysis.plots import plot_mean_series

        table = self.table
        if not table.empty and table["unit"].nunique() > 1:
            # A folder mixing calibrated and uncalibrated frames: summarise the latest frame's unit only.
            unit = table["unit"].iloc[-1]
            table = table[table["unit"] == unit]
        sent = {k: v for k, v in self.frames.items() if v.get("status") == "sent"}
        psd = psd_summary(table, images=sorted(sent))
        psd.pop("per_image", None)  # the per-frame series below says the same, in acquisition order
        series = sorted(
            (
                {
                    "frame_index": v["frame_index"],
                    "file": k,
                    "acquired_at": v["acquired_at"],
                    "mtime": v["mtime"],
                    "count": v.get("count"),
                    "mean_diameter": v.get("mean_diameter"),
                    "mean_diameter_ci95": v.get("mean_diameter_ci95"),
                }
                for k, v in sent.items()
            ),
            key=lambda r: r["frame_index"],
        )
        summary = {
            "frames": len(sent),
            "rejected": sum(v.get("status") == "rejected" for v in self.frames.values()),
            "count": psd["count"],
            "mean_diameter": psd["mean"],
            "unit": psd["unit"],
            "drift": _drift(series),
            "psd": psd,
            "per_frame": series,
            "updated_at": datetime.now(timezone.utc).isoformat(),
        }
        write_summary(summary, self.out / SUMMARY_JSON)
        plot_psd(table, psd, self.out / PSD_PNG)
        plot_mean_series(series, psd["unit"], self.out / SERIES_PNG)
        write_particles_parquet(self.table, self.out / PARTICLES_PARQUET)
        return summary


def _mean_interval(particles: pd.DataFrame, seed: int) -> list[float] | None:
    """95% bootstrap interval [low, high] of one frame's mean diameter, resampling its interior particles."""
    from tgan_ray.analysis.bootstrap import bootstrap_psd

    if particles.empty:
        return None
    interior = particles.loc[~particles["touches_border"].astype(bool), "equivalent_diameter"]
    ci = bootstrap_psd(interior.to_numpy(dtype=float), None, seed=seed, statistics=("mean",))
    return None if ci is None else [ci["mean"]["low"], ci["mean"]["high"]]


def _drift(series: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Linear trend of the per-frame mean diameter, per frame and per minute of acquisition time."""
    from scipy import stats

    points = [r for r in series if r["mean_diameter"] is not None]
    if len(points) < 2:
        return None
    index = np.array([r["frame_index"] for r in points], float)
    minutes = np.array([r["mtime"] for r in points], float) / 60.0
    mean_d = np.array([r["mean_diameter"] for r in points], float)
    per_frame = stats.linregress(index, mean_d) if np.ptp(index) > 0 else None
    per_minute = stats.linregress(minutes - minutes.min(), mean_d) if np.ptp(minutes) > 0 else None

    def finite(x: float | None) -> float | None:
        return float(x) if x is not None and np.isfinite(x) else None

    return {
        "frames": len(points),
        "first": float(mean_d[0]),
        "last": float(mean_d[-1]),
        "per_frame": finite(per_frame.slope) if per_frame else None,
        "per_minute": finite(per_minute.slope) if per_minute else None,
        "r": finite(per_frame.rvalue) if per_frame else None,
    }


def _send(client, url: str, path: Path, rel: str, data: bytes, pixel_size_nm: float | None) -> dict[str, Any]:
    import httpx

    form = {"pixel_size_nm": str(pixel_size_nm)} if pixel_size_nm else None
    try:
        response = client.post(url, files={"file": (path.name, data)}, data=form)
    except httpx.TransportError as exc:  # refused, reset, timeout, DNS: the endpoint is not there (yet)
        raise _Retry(f"{type(exc).__name__}: {exc}") from None
    if response.status_code in _RETRY_STATUSES:
        raise _Retry(f"HTTP {response.status_code}", retry_after_s(response.headers.get("retry-after")))
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:200]}
    if response.status_code >= 400:
        raise _Rejected(
            f"HTTP {response.status_code}: {body.get('detail', '') if isinstance(body, dict) else body}"
        )
    if not isinstance(body, dict) or "particles" not in body:
        raise _Rejected(f"unexpected response for {rel}: not a segmentation result")
    return body


class _Watcher:
    """The poll loop's state: which files are settling, when the next attempt may go, what this run did."""

    def __init__(self, root: Path, session: _Session, url: str, settle_s: float, recursive: bool, say):
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
            response = _send(client, self.url, path, rel, data, pixel_size_nm)
        except _Retry as exc:
            self.backoff = min(max(self.backoff * 2, retry[0]), retry[1])
            wait, why = self.backoff, ""
            if exc.after_s is not None and exc.after_s > wait:  # the server knows best, within our cap
                wait, why = min(exc.after_s, retry[1]), " (the server's Retry-After)"
            self.next_attempt = time.monotonic() + wait
            self.result.retries += 1
            self.say(f"endpoint unavailable ({exc}); retrying {rel} in {wait:.1f} s{why}")
            return False
        except _Rejected as exc:
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
    session = _Session(Path(out_dir) if out_dir is not None else root / "tgan-watch")
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
