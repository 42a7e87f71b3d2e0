"""`tgan watch` against a small local stand-in for the segmentation service (plain HTTP, real sockets).

The stand-in decodes each upload, thresholds it and measures the blobs, so the client's CSV, ledger and summary
see realistic responses. The real Serve app is exercised end to end in test_serve.py.
"""

import hashlib
import io
import json
import os
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tgan_ray.watch import _is_candidate, watch_folder
from tgan_ray.watch_client import retry_after_s, segment_url
from tgan_ray.watch_outputs import PARTICLES_CSV

INTERVAL = 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _disc_png(seed: int, size: int = 64) -> bytes:
    """Bright discs on a dark background: an image the stand-in's threshold segments exactly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), 20, np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.integers(8, size - 8, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(3, 7) ** 2] = 220
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(body: bytes, content_type: str) -> tuple[str, bytes]:
    """The ``file`` field of a multipart body, parsed by python-multipart (as Starlette does in the service)."""
    from python_multipart import parse_form

    files = {}

    def on_file(f):
        f.file_object.seek(0)
        files[f.field_name.decode()] = (f.file_name.decode(), f.file_object.read())

    headers = {"Content-Type": content_type.encode(), "Content-Length": str(len(body)).encode()}
    parse_form(headers, io.BytesIO(body), None, on_file)
    return files["file"]


class StandIn:
    """A threaded HTTP server answering POST /v1/segment like the service does (JSON particles, 400 on junk)."""

    def __init__(self, port: int, fail_first: int = 0, retry_after: str | None = None):
        self.received: list[tuple[str, str]] = []  # (file name, sha256 of the bytes)
        self.fail_first = fail_first
        self.retry_after = retry_after  # the Retry-After header of those 503s
        self.refused = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status, payload = stand_in.answer(body, self.headers.get("content-type", ""))
                data = json.dumps(payload).encode()
                self.send_response(status)
                if status == 503 and stand_in.retry_after is not None:
                    self.send_header("retry-after", stand_in.retry_after)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, body: bytes, content_type: str):
        from tgan_ray.analysis import measure_particles, psd_summary
        from tgan_ray.io import ImageReadError, decode_image

        if self.fail_first > 0:
            self.fail_first -= 1
            self.refused += 1
            return 503, {"detail": "replica starting"}
        name, data = _upload(body, content_type)
        self.received.append((name, hashlib.sha256(data).hexdigest()))
        try:
            image = decode_image(data, name)
        except ImageReadError as exc:
            return 400, {"detail": str(exc)}
        df = measure_particles(image.data > 128, name, 0.5)
        rows = json.loads(df.to_json(orient="records"))
        return 200, {"particles": rows, "summary": psd_summary(df, [name]), "model": {"name": "stand-in"}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stand_in():
    server = StandIn(_free_port())
    yield server
    server.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _acquired(folder, prefix: str, seed: int, n: int) -> dict[str, bytes]:
    """n frames written into the watched folder one after another (distinct mtimes: acquisition order)."""
    folder.mkdir()
    frames = {f"{prefix}{i}.png": _disc_png(seed + i) for i in range(n)}
    for name, data in frames.items():
        (folder / name).write_bytes(data)
        time.sleep(0.02)
    return frames


def _run_in_thread(**kwargs):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", watch_folder(**kwargs)), daemon=True)
    thread.start()
    return thread, box


def test_files_written_during_the_watch_are_sent_once_each(tmp_path, stand_in):
    folder, out = tmp_path / "microscope", tmp_path / "live"
    folder.mkdir()
    url = f"http://127.0.0.1:{stand_in.server.server_port}"
    thread, box = _run_in_thread(
        folder=folder, endpoint=url, out_dir=out, interval=INTERVAL, max_files=3, stop_after_s=30
    )
    expected = {}
    time.sleep(0.3)
    # a.png: written in one go.
    expected["a.png"] = _disc_png(1)
    (folder / "a.png").write_bytes(expected["a.png"])
    # b.png: written slowly, in two chunks with a pause shorter than the settle time.
    expected["b.png"] = _disc_png(2)
    half = len(expected["b.png"]) // 2
    with open(folder / "b.png", "wb") as f:
        f.write(expected["b.png"][:half])
        f.flush()
        time.sleep(INTERVAL * 0.6)
        f.write(expected["b.png"][half:])
    # c.png: written under a temporary name, then renamed, as many acquisition programs do.
    expected["c.png"] = _disc_png(3)
    (folder / "c.png.tmp").write_bytes(expected["c.png"])
    # Never sent: hidden files, temporary names, files that are not images.
    (folder / ".hidden.png").write_bytes(_disc_png(4))
    (folder / "notes.txt").write_text("sample 42")
    time.sleep(INTERVAL * 2)
    os.replace(folder / "c.png.tmp", folder / "c.png")
    thread.join(40)
    result = box["result"]

    assert sorted(result.sent) == ["a.png", "b.png", "c.png"] and not result.rejected
    assert sorted(stand_in.received) == sorted((n, _sha(d)) for n, d in expected.items())  # once, complete
    table = pd.read_csv(out / PARTICLES_CSV)
    assert set(table.file) == set(expected) and table.frame_index.nunique() == 3
    ledger = json.loads((out / "sent.json").read_text())
    assert {k: v["status"] for k, v in ledger["frames"].items()} == dict.fromkeys(expected, "sent")
    summary = json.loads((out / "running_summary.json").read_text())
    assert summary["frames"] == 3 and summary["count"] + summary["psd"]["border_count"] == len(table)
    assert summary["unit"] == "nm" and summary["drift"]["frames"] == 3
    assert [r["file"] for r in summary["per_frame"]] == result.sent  # acquisition order
    assert (out / "psd.png").stat().st_size > 0 and (out / "mean_diameter.png").stat().st_size > 0
    # Each frame's mean diameter with its bootstrap interval over the frame's own interior particles.
    for frame in summary["per_frame"]:
        rows = table[(table.file == frame["file"]) & ~table.touches_border]
        assert frame["mean_diameter"] == pytest.approx(rows.equivalent_diameter.mean())
        low, high = frame["mean_diameter_ci95"]
        assert rows.equivalent_diameter.min() <= low <= frame["mean_diameter"] <= high
        assert high <= rows.equivalent_diameter.max() and (high > low) == (
            rows.equivalent_diameter.nunique() > 1
        )
    pd.testing.assert_frame_equal(pd.read_parquet(out / "particles.parquet"), table, check_dtype=False)

    # A restart never resends.
    again = watch_folder(folder, url, out, interval=INTERVAL, stop_after_s=1.0)
    assert again.sent == [] and len(stand_in.received) == 3


def test_frames_wait_while_the_endpoint_is_down(tmp_path):
    folder, out = tmp_path / "microscope", tmp_path / "live"
    frames = _acquired(folder, "f", 10, 3)
    port = _free_port()  # nothing listens here yet
    thread, box = _run_in_thread(
        folder=folder,
        endpoint=f"http://127.0.0.1:{port}",
        out_dir=out,
        interval=INTERVAL,
        max_files=3,
        stop_after_s=40,
        retry_initial_s=0.2,
        retry_max_s=0.8,
    )
    time.sleep(2.0)
    assert not (out / PARTICLES_CSV).exists()
    server = StandIn(port, fail_first=2)  # back, but answering 503 twice more (replicas still starting)
    try:
        thread.join(40)
    finally:
        server.close()
    result = box["result"]
    assert result.sent == ["f0.png", "f1.png", "f2.png"] and result.retries >= 3
    assert sorted(server.received) == sorted((n, _sha(d)) for n, d in frames.items())


def test_503_with_retry_after_is_honoured_and_no_frame_is_lost(tmp_path):
    folder, out = tmp_path / "microscope", tmp_path / "live"
    frames = _acquired(folder, "g", 40, 4)
    server = StandIn(_free_port(), fail_first=3, retry_after="1")  # overloaded: "come back in 1 s", 3 times
    messages: list[str] = []
    try:
        result = watch_folder(
            folder,
            f"http://127.0.0.1:{server.server.server_port}",
            out,
            interval=0.05,
            max_files=4,
            stop_after_s=60,
            retry_initial_s=0.05,  # far below the server's Retry-After: the header sets the wait
            retry_max_s=5,
            log=messages.append,
        )
    finally:
        server.close()
    assert result.sent == list(frames) and not result.rejected and not result.pending
    assert result.retries == 3 == server.refused
    waits = [m for m in messages if "retrying" in m]
    assert len(waits) == 3 and all("in 1.0 s (the server's Retry-After)" in m for m in waits), waits
    assert sorted(server.received) == sorted((n, _sha(d)) for n, d in frames.items())  # each once, complete
    table = pd.read_csv(out / PARTICLES_CSV)
    assert set(table.file) == set(frames) and table.frame_index.nunique() == 4


def test_retry_after_header_values():
    from email.utils import format_datetime

    assert retry_after_s("7") == 7.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 20 < retry_after_s(later) <= 30
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now


def test_a_rejected_file_is_resent_once_it_changes(tmp_path, stand_in):
    folder, out = tmp_path / "microscope", tmp_path / "live"
    folder.mkdir()
    url = f"http://127.0.0.1:{stand_in.server.server_port}"
    data = _disc_png(20)
    (folder / "slow.png").write_bytes(
        data[: len(data) // 2]
    )  # the writer stalled longer than the settle time
    first = watch_folder(folder, url, out, interval=INTERVAL, max_files=1, stop_after_s=20)
    assert list(first.rejected) == ["slow.png"] and "HTTP 400" in first.rejected["slow.png"]
    assert (
        watch_folder(folder, url, out, interval=INTERVAL, stop_after_s=0.8).rejected == {}
    )  # not retried as is
    (folder / "slow.png").write_bytes(data)
    second = watch_folder(folder, url, out, interval=INTERVAL, max_files=1, stop_after_s=20)
    assert second.sent == ["slow.png"] and stand_in.received[-1] == ("slow.png", _sha(data))
    assert len(stand_in.received) == 2


def test_rows_without_a_ledger_entry_are_cut_on_restart(tmp_path, stand_in):
    folder, out = tmp_path / "microscope", tmp_path / "live"
    folder.mkdir()
    url = f"http://127.0.0.1:{stand_in.server.server_port}"
    (folder / "a.png").write_bytes(_disc_png(30))
    watch_folder(folder, url, out, interval=INTERVAL, max_files=1, stop_after_s=20)
    good = (out / PARTICLES_CSV).read_bytes()
    with open(out / PARTICLES_CSV, "ab") as f:  # a crash after appending rows, before the ledger was saved
        f.write(b"1,b.png,2026-01-01,b.png,1,3.0,4.0,")
    watch_folder(folder, url, out, interval=INTERVAL, stop_after_s=0.5)
    assert (out / PARTICLES_CSV).read_bytes() == good


def test_endpoint_urls_and_file_names():
    assert segment_url("http://gpu:8000") == "http://gpu:8000/v1/segment"
    assert segment_url("127.0.0.1:8000/") == "http://127.0.0.1:8000/v1/segment"
    assert segment_url("https://h/api/seg?x=1") == "https://h/api/seg?x=1"
    with pytest.raises(ValueError, match="ftp://h"):
        segment_url("ftp://h")
    assert _is_candidate("frame_001.dm4") and _is_candidate("A.TIF")
    for name in ("frame.tif.tmp", ".frame.png", "frame.png.part", "~frame.png", "notes.txt", "frame.png~"):
        assert not _is_candidate(name), name


def test_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(NotADirectoryError, match="nope"):
        watch_folder(tmp_path / "nope", "http://127.0.0.1:9")
