"""The Ray Serve endpoint on the session's local Ray (CPU): results, bad input, the model registry, and watch.

A tiny NPsSegNet (UNet++/ResNet18, 3 stages) is trained here on synthetic HAADF frames for a few seconds, so the
particle counts the service returns can be checked against the frames' ground truth.
"""

import asyncio
import io
import socket

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image

from tgan_ray.analysis import measure_particles
from tgan_ray.config import Config, DataConfig
from tgan_ray.data.synthetic import SynthConfig, make_image
from tgan_ray.io import normalize_intensity

PIXEL_NM = 0.5
SYNTH = {"pixel_size_nm": PIXEL_NM, "mean_diameter_nm": 5.0, "density": 40, "snr": 10.0}
MAX_UPLOAD = 2**20
MAX_PIXELS = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _frame(seed: int, size: int = 128):
    """A synthetic frame as a 16-bit PNG, with its true mask and its true particle count (interior + border)."""
    image, mask, labels = make_image(SynthConfig(size=size, **SYNTH), rng=seed)
    return _png(np.round(image * 65535).astype(np.uint16)), mask, len(measure_particles(labels, "truth"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from tgan_ray.models.npssegnet import create_segmenter, save_segmenter

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64 px net: extra threads only spin, and the CPU is shared with Ray
    pairs = [make_image(SynthConfig(size=64, **SYNTH), rng=i)[:2] for i in range(32)]
    x = torch.tensor(np.stack([normalize_intensity(image) for image, _ in pairs]))[:, None]
    y = torch.tensor(np.stack([mask for _, mask in pairs])).long()
    net = create_segmenter("unetplusplus", "resnet18", encoder_depth=3, decoder_channels=(16, 8, 8))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(50):
        idx = torch.randint(0, len(x), (8,), generator=g)
        xb, yb = (x[idx], y[idx]) if step % 2 else (x[idx].flip(-1), y[idx].flip(-1))
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("model") / "tiny-npssegnet.pt"
    meta = {
        "data": DataConfig(image_size=64, resize_mode="tile").model_dump(mode="json"),
        "source_run": "test-run",
    }
    return save_segmenter(net.eval(), path, meta=meta)


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_model):
    from ray import serve

    from tgan_ray.serve import serve_model

    cfg = Config.model_validate(
        {
            "serve": {
                "port": _free_port(),
                "cpus_per_replica": 0.5,
                "max_upload_bytes": MAX_UPLOAD,
                "max_pixels": MAX_PIXELS,
                "max_batch_size": 4,
                "batch_wait_timeout_s": 0.1,
            }
        }
    )
    url = serve_model(str(tiny_model), cfg, blocking=False, name="tgan-test")
    yield url
    serve.shutdown()


@pytest.fixture()
def client(endpoint):
    with httpx.Client(base_url=endpoint, timeout=120) as c:
        yield c


def test_segment_counts_known_particles(client, tiny_model):
    png, _, true_count = _frame(seed=101)
    r = client.post("/v1/segment", files={"file": ("frame.png", png)}, data={"pixel_size_nm": str(PIXEL_NM)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == "frame.png" and body["shape"] == [128, 128]
    assert body["pixel_size_nm"] == PIXEL_NM and body["pixel_size_from"] == "request"
    found = len(body["particles"])
    assert abs(found - true_count) <= max(2, 0.2 * true_count), (found, true_count)
    assert body["summary"]["count"] + body["summary"]["border_count"] == found
    assert body["summary"]["unit"] == "nm" and 3.0 < body["summary"]["mean"] < 7.0  # synthetic mean: 5 nm
    assert {"centroid_x", "equivalent_diameter", "touches_border"} <= set(body["particles"][0])
    assert body["model"] == {"name": "tiny-npssegnet", "version": body["model"]["version"]}
    assert body["model"]["version"].startswith("sha256:")
    assert set(body["timing_ms"]) == {"decode", "inference", "analysis", "total"}


def test_raw_body_and_tiff_calibration(client):
    png, _, true_count = _frame(seed=102)
    r = client.post("/v1/segment", content=png, params={"pixel_size_nm": PIXEL_NM})
    assert r.status_code == 200, r.text
    assert abs(len(r.json()["particles"]) - true_count) <= max(2, 0.2 * true_count)
    # `curl --data-binary @frame.png` labels the raw body a urlencoded form: it is still the image.
    curl_like = {"content-type": "application/x-www-form-urlencoded"}
    r = client.post("/v1/segment", content=png, headers=curl_like, params={"filename": "frame.png"})
    assert r.status_code == 200 and r.json()["image"] == "frame.png", r.text
    # A TIFF calibrated in nm (ImageJ style): the service takes the pixel size from the file.
    image = np.asarray(Image.open(io.BytesIO(png)))
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer, image, imagej=True, resolution=(1 / PIXEL_NM, 1 / PIXEL_NM), metadata={"unit": "nm"}
    )
    r = client.post("/v1/segment", files={"file": ("frame.tif", buffer.getvalue())})
    assert r.status_code == 200, r.text
    assert r.json()["pixel_size_from"] == "file" and r.json()["pixel_size_nm"] == pytest.approx(PIXEL_NM)


def test_mask_png_has_the_frame_size(client):
    png, true_mask, _ = _frame(seed=103, size=96)
    r = client.post("/v1/segment", params={"mask": "png"}, files={"file": ("f.png", png)})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 255}
    predicted = mask > 0
    assert (predicted & true_mask).sum() / (predicted | true_mask).sum() > 0.6  # IoU with the ground truth


def test_model_health_and_openapi(client, tiny_model):
    health = client.get("/v1/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert info["name"] == "tiny-npssegnet" and info["version"].startswith("sha256:")
    assert info["training_run"] == "test-run" and info["arch"] == "UnetPlusPlus"
    assert info["tile_size"] == 64 and info["resize_mode"] == "tile" and info["device"] == "cpu"
    schema = client.get("/openapi.json").json()
    assert {"/v1/segment", "/v1/healthz", "/v1/model"} <= set(schema["paths"])
    body = schema["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/octet-stream" in body


def test_concurrent_requests_are_batched(endpoint):
    frames = [_frame(seed=200 + i, size=64)[0] for i in range(8)]

    async def fire():
        async with httpx.AsyncClient(base_url=endpoint, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/segment", content=f) for f in frames))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert max(r.json()["batch_size"] for r in responses) >= 2


def _bomb() -> bytes:
    # 2048 x 2048 px of zeros: a few kB of PNG that would decode to 4 Mpx, over MAX_PIXELS.
    return _png(np.zeros((2048, 2048), np.uint8))


def _chunks(total: int, head: bytes = b""):
    yield head
    for _ in range(total // 65536 + 1):
        yield b"\0" * 65536


_MULTIPART_HEAD = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'


BAD_INPUTS = {
    "not an image": (400, {"files": {"file": ("x.png", b"hello, not an image at all")}}),
    "truncated png": (400, {"content": _frame(seed=300, size=64)[0][:400]}),
    "unsupported format": (
        415,
        {"content": b"%PDF-1.4 not a micrograph", "params": {"filename": "paper.pdf"}},
    ),
    "unknown bytes, no name": (415, {"content": b"\x01\x02\x03 unknown"}),
    "empty body": (400, {"content": b""}),
    "empty file field": (400, {"files": {"file": ("x.png", b"")}}),
    "multipart without file": (400, {"files": {"image": ("x.png", b"abc")}}),
    "multipart without boundary": (
        400,
        {"content": b"abc", "headers": {"content-type": "multipart/form-data"}},
    ),
    "too many bytes": (413, {"content": b"\0" * (MAX_UPLOAD + 1)}),
    "too many bytes, chunked": (413, {"content": _chunks(MAX_UPLOAD + 1)}),
    "too many bytes, multipart": (413, {"files": {"file": ("big.png", b"\0" * (MAX_UPLOAD + 1))}}),
    "too many bytes, chunked multipart": (
        413,
        {
            "content": _chunks(MAX_UPLOAD + 1, _MULTIPART_HEAD),
            "headers": {"content-type": "multipart/form-data; boundary=xyz"},
        },
    ),
    "truncated multipart": (
        400,
        {
            "content": _MULTIPART_HEAD + b"abc",
            "headers": {"content-type": "multipart/form-data; boundary=xyz"},
        },
    ),
    "decompression bomb": (413, {"content": _bomb()}),
    "negative pixel size": (400, {"content": b"x", "params": {"pixel_size_nm": -1}}),
    "pixel size not a number": (400, {"files": {"file": ("x.png", b"x")}, "data": {"pixel_size_nm": "abc"}}),
    "unknown mask format": (400, {"content": b"x", "params": {"mask": "jpeg"}}),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_the_replica_survives(client, case):
    status, request = BAD_INPUTS[case]
    replica = client.get("/v1/healthz").json()["replica"]
    r = client.post("/v1/segment", **request)
    assert r.status_code == status, (case, r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    health = client.get("/v1/healthz")
    assert health.status_code == 200 and health.json()["replica"] == replica  # same replica: not restarted


def test_good_request_after_bad_ones(client):
    png, _, _ = _frame(seed=104, size=64)
    assert client.post("/v1/segment", content=png).status_code == 200


# ---------------------------------------------------------------------------------------------- overload, deadline


def _side_app(tiny_model, name: str, **serve_cfg):
    """A second application on the module's Serve instance (same proxy), under /<name>, with its own limits."""
    from ray import serve

    from tgan_ray.serve import build_app

    cfg = Config.model_validate({"serve": {"cpus_per_replica": 0.25, "max_batch_size": 1, **serve_cfg}})
    serve.run(build_app(str(tiny_model), cfg), name=name, route_prefix=f"/{name}", blocking=False)
    return name


def test_overload_is_refused_with_503_and_retry_after(endpoint, tiny_model):
    from ray import serve

    # One request in the replica, one queued: the rest of a burst is refused at once, none waits unbounded.
    name = _side_app(tiny_model, "tight", max_ongoing_requests=1, max_queued_requests=1, retry_after_s=3)
    frames = [_frame(seed=500 + i, size=256)[0] for i in range(12)]

    async def burst():
        async with httpx.AsyncClient(base_url=f"{endpoint}/{name}", timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/segment", content=f) for f in frames))

    try:
        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "3" and "max_queued_requests" in r.text, r.text
                assert "\n" not in r.text.strip()
        with httpx.Client(base_url=f"{endpoint}/{name}", timeout=120) as c:  # the replica is fine after
            assert c.get("/v1/healthz").status_code == 200
            assert c.post("/v1/segment", content=frames[0]).status_code == 200
    finally:
        serve.delete(name)


def test_request_past_its_deadline_gets_504_and_the_replica_lives(endpoint, tiny_model):
    from ray import serve

    # 1 ms: no 512 px frame is decoded, tiled, segmented and measured that fast.
    name = _side_app(tiny_model, "deadline", request_timeout_s=0.001, retry_after_s=1)
    png = _frame(seed=600, size=512)[0]
    try:
        with httpx.Client(base_url=f"{endpoint}/{name}", timeout=120) as c:
            replica = c.get("/v1/healthz").json()["replica"]
            for request in ({"content": png}, {"files": {"file": ("f.png", png)}}):
                r = c.post("/v1/segment", **request)
                assert r.status_code == 504, r.text
                detail = r.json()["detail"]
                assert "serve.request_timeout_s=0.001" in detail and "\n" not in detail
                assert r.headers["retry-after"] == "1"
            health = c.get("/v1/healthz")
            assert health.status_code == 200 and health.json()["replica"] == replica
    finally:
        serve.delete(name)


@pytest.mark.integration  # builds Serve's application
def test_queue_and_deadline_settings_reach_serve(tiny_model):
    from tgan_ray.serve import deployment_options, proxy_timeout_s

    cfg = Config.model_validate(
        {"serve": {"max_queued_requests": 5, "retry_after_s": 4, "request_timeout_s": 10}}
    )
    options = deployment_options(cfg)
    assert options["max_queued_requests"] == 5
    assert (
        options["backpressure_config"].retry_after_s == 4
        and options["backpressure_config"].status_code == 503
    )
    assert proxy_timeout_s(cfg) > 10
    with pytest.raises(ValueError, match="max_queued_requests=0"):
        Config.model_validate({"serve": {"max_queued_requests": 0}})


# ---------------------------------------------------------------------------------------------- model URIs


def test_resolve_registry_and_s3_models(tmp_path, tiny_model, s3_bucket, monkeypatch):
    import boto3

    from tgan_ray.serve import resolve_model, resolve_model_uri
    from tgan_ray.tracking import Tracker

    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = Tracker(uri, "serve-test").start_child("segmenter")
    assert str(run.register_model(tiny_model, "npssegnet")) == "1"
    cfg = Config.model_validate({"tracking": {"tracking_uri": uri}})
    cache = tmp_path / "cache"
    for model_uri in ("models:/npssegnet/1", "models:/npssegnet/latest"):
        source = resolve_model(model_uri, cfg, cache_dir=cache)
        assert (source.name, source.version, source.run_id) == ("npssegnet", "1", run.run_id)
        assert open(source.path, "rb").read() == tiny_model.read_bytes()
    with pytest.raises(ValueError, match="npssegnet/7"):
        resolve_model("models:/npssegnet/7", cfg, cache_dir=cache)
    with pytest.raises(ValueError, match="bad model URI"):
        resolve_model("models:/npssegnet", cfg)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        resolve_model(str(tmp_path / "nowhere.pt"), cfg)

    endpoint_url, bucket = s3_bucket
    boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1").upload_file(
        str(tiny_model), bucket, "models/npssegnet.pt"
    )
    s3_cfg = Config.model_validate({"storage": {"s3_endpoint_url": endpoint_url}})
    local = resolve_model_uri(f"s3://{bucket}/models/npssegnet.pt", s3_cfg, cache_dir=cache)
    assert open(local, "rb").read() == tiny_model.read_bytes()


# ---------------------------------------------------------------------------------------------- watch, end to end


def test_watch_sends_frames_to_the_service(endpoint, tmp_path):
    import json

    import pandas as pd

    from tgan_ray.watch import watch_folder

    folder = tmp_path / "microscope"
    folder.mkdir()
    counts = {}
    for i in range(2):
        png, _, true_count = _frame(seed=400 + i, size=96)
        (folder / f"frame_{i}.png").write_bytes(png)
        counts[f"frame_{i}.png"] = true_count
    out = tmp_path / "live"
    result = watch_folder(
        folder, endpoint, out, interval=0.2, max_files=2, stop_after_s=60, pixel_size_nm=PIXEL_NM
    )
    assert sorted(result.sent) == sorted(counts) and not result.rejected
    table = pd.read_csv(out / "particles.csv")
    for name, true_count in counts.items():
        assert abs((table.file == name).sum() - true_count) <= max(2, 0.2 * true_count)
    summary = json.loads((out / "running_summary.json").read_text())
    assert summary["frames"] == 2 and summary["unit"] == "nm" and (out / "psd.png").is_file()
