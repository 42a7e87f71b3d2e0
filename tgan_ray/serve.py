"""Ray Serve segmentation endpoint: one EM frame in, particle table + PSD summary (or the mask) out.

    tgan serve --model runs/r1/round1/npssegnet.pt          # or s3://bucket/npssegnet.pt, models:/npssegnet/3
    curl -F file=@frame.dm4 http://127.0.0.1:8000/v1/segment
    curl --data-binary @frame.tif "http://127.0.0.1:8000/v1/segment?pixel_size_nm=0.21&mask=png" -o mask.png

Concurrent requests are grouped by ``@serve.batch``: the tiles of every frame in a batch go through the network
together (``Segmenter.tile`` cuts each frame into inference tiles first, as ``tgan segment`` does).
Replicas, autoscaling bounds, CPUs/GPUs per replica, batch size and upload limits come from ``cfg.serve``.

Overload: each replica holds at most ``serve.max_ongoing_requests``; beyond that Serve's proxy queues
``serve.max_queued_requests`` and refuses the rest at once with 503 and ``Retry-After: serve.retry_after_s``
(Serve's own backpressure response, a one-line text body). A request not answered within
``serve.request_timeout_s`` gets 504 with a JSON detail (:mod:`tgan_ray.serve_requests`); the proxy cuts any
request (408) a little after that, time spent queued included. Nothing waits without bound.

Safety: a request can never kill a replica (every failure becomes a one-line JSON error); multipart uploads are
parsed by Starlette (python-multipart) into an ``UploadFile`` (memory, or an anonymous temporary file over 1 MB),
so nothing a client sends reaches a path it names; checkpoints load without unpickling objects.
"""

# No `from __future__ import annotations`: Serve's class-based FastAPI views resolve the route annotations
# (Request, Query, UploadFile) at run time, from a module other than this one.

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from tgan_ray.config import Config, ServeConfig
from tgan_ray.model_uri import ModelSource, _tracking_uri, resolve_model, resolve_model_uri
from tgan_ray.serve_requests import (
    ErrorBody,
    ModelInfo,
    RequestError,
    SegmentResult,
    UploadGuard,
    bad_parameters,
    error_response,
    http_error,
    json_records,
    mask_png,
    safe_name,
)

__all__ = [
    "ModelSource",
    "SegmentationService",
    "build_app",
    "deployment_options",
    "resolve_model",
    "resolve_model_uri",
    "serve_model",
]

_log = logging.getLogger("tgan_ray.serve")

API_PREFIX = "/v1"
MASK_THRESHOLD = 0.5  # particle probability above which a pixel is a particle (as in Segmenter.segment)


# ---------------------------------------------------------------------------------------------- the service


_RAW_BODY = {"schema": {"type": "string", "format": "binary", "description": "the image file's bytes"}}


app = FastAPI(
    title="tgan-ray segmentation",
    version="1",
    description="Segments nanoparticles in one electron micrograph and returns the particle table and PSD.",
)


def _replica_limits() -> tuple[int, float, float]:
    """This replica's upload limit, deadline and Retry-After (the defaults outside a Serve replica)."""
    try:
        s = serve.get_replica_context().servable_object.cfg.serve
    except Exception:  # noqa: BLE001 - not in a replica (yet)
        s = ServeConfig()
    return s.max_upload_bytes, s.request_timeout_s, s.retry_after_s


app.add_middleware(UploadGuard, limits=_replica_limits, path_suffix=f"{API_PREFIX}/segment")
app.add_exception_handler(RequestValidationError, bad_parameters)
app.add_exception_handler(StarletteHTTPException, http_error)


@serve.deployment(name="SegmentationService")
@serve.ingress(app)
class SegmentationService:
    """One replica: a loaded NPsSegNet behind the FastAPI routes.

    Args:
        model_uri: checkpoint path, ``s3://`` or ``models:/`` URI (resolved in the replica, cached per node).
        cfg: the full config as a plain dict (``Config.model_dump(mode="json")``).
    """

    def __init__(self, model_uri: str, cfg: dict[str, Any]):
        from tgan_ray.inference import Segmenter

        self.cfg = Config.model_validate(cfg)
        self.source = resolve_model(model_uri, self.cfg)
        self.segmenter = Segmenter(self.source.path, None, self.cfg.segmenter)
        if "data" not in self.segmenter.meta:  # an exported stage checkpoint: tiles as the config says
            self.segmenter.data_cfg = self.cfg.data
        # The forward pass gets its own thread, so it never queues behind decoding or particle analysis.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tgan-forward")
        serve_cfg = self.cfg.serve
        self._forward.set_max_batch_size(serve_cfg.max_batch_size)
        self._forward.set_batch_wait_timeout_s(serve_cfg.batch_wait_timeout_s)
        meta = self.segmenter.meta
        self.info = ModelInfo(
            name=self.source.name,
            version=self.source.version,
            uri=self.source.uri,
            run_id=self.source.run_id,
            training_run=self.source.run_id or meta.get("source_run") or meta.get("run_id"),
            arch=type(self.segmenter.model).__name__,
            tile_size=self.segmenter.data_cfg.image_size,
            resize_mode=self.segmenter.data_cfg.resize_mode,
            device=str(self.segmenter.device),
            meta={k: v for k, v in meta.items() if isinstance(v, str | int | float | bool) or v is None},
        ).model_dump()
        self._model_tag = {"name": self.source.name, "version": self.source.version}
        self._replica = serve.get_replica_context().replica_id.unique_id

    # -- batched forward pass ---------------------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # replaced from cfg.serve in __init__
    async def _forward(self, tile_stacks: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        """Probabilities for the tiles of several requests in one forward pass, each with the batch's size.

        The pass runs in a thread so the event loop keeps accepting requests, and the next batch fills meanwhile.
        """
        loop = asyncio.get_running_loop()
        probs = await loop.run_in_executor(
            self._model_thread, self.segmenter.predict_tile_stacks, tile_stacks
        )
        return [(p, len(tile_stacks)) for p in probs]

    # -- per-request steps ------------------------------------------------------------------------------------
    def _prepare(self, data: bytes, name: str):
        from tgan_ray.io import ImageReadError, UnsupportedFormatError, decode_image

        try:
            image = decode_image(data, name, max_pixels=self.cfg.serve.max_pixels)
        except UnsupportedFormatError as exc:
            raise RequestError(415, str(exc)) from None
        except ImageReadError as exc:
            status = 413 if exc.reason.startswith(("image too large", "not enough memory")) else 400
            raise RequestError(status, str(exc)) from None
        d = self.segmenter.data_cfg
        norm = d.normalize(image.data)
        tiles, tilemap = self.segmenter.tiles_of(norm)
        return image, norm, tiles, tilemap

    def _to_mask(self, probs: np.ndarray, tilemap, norm: np.ndarray) -> np.ndarray:
        probability = self.segmenter.blend(probs, tilemap, norm.shape)
        return self.segmenter.to_mask(probability, MASK_THRESHOLD, image=norm)

    def _analyse(self, mask: np.ndarray, name: str, pixel_size_nm: float | None) -> tuple[list, dict]:
        from tgan_ray.analysis import measure_particles, psd_summary

        df = measure_particles(mask, name, pixel_size_nm)
        return json_records(df), psd_summary(df, images=[name])

    async def _segment(
        self,
        request: Request,
        upload: UploadFile | None,
        pixel_size_nm: float | None,
        want_mask: bool,
        filename: str | None,
    ):
        t0 = time.perf_counter()
        name = safe_name(filename)
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            if upload is None:  # Starlette parsed the form already; the body is spent
                raise RequestError(400, "multipart upload has no 'file' field")
            body = await upload.read()
            name = safe_name(upload.filename or filename)
        else:  # the raw body is the image (UploadGuard has counted it against serve.max_upload_bytes)
            body = b"".join([chunk async for chunk in request.stream()])
        if not body:
            raise RequestError(400, "empty upload: send the image as the 'file' field or as the raw body")
        image, norm, tiles, tilemap = await asyncio.to_thread(self._prepare, body, name)
        t1 = time.perf_counter()
        probs, batch_size = await self._forward(tiles)
        t2 = time.perf_counter()
        mask = await asyncio.to_thread(self._to_mask, probs, tilemap, norm)
        if want_mask:
            headers = {"X-Model-Version": self.source.version, "X-Inference-Ms": f"{(t2 - t1) * 1e3:.1f}"}
            return Response(await asyncio.to_thread(mask_png, mask), media_type="image/png", headers=headers)
        # Pixel size: the request's, else the config's override, else the file's calibration, else px.
        candidates = (
            (pixel_size_nm, "request"),
            (self.cfg.data.pixel_size_nm, "config"),
            (image.pixel_size_nm, "file"),
        )
        size, origin = next(((v, o) for v, o in candidates if v is not None), (None, "none"))
        particles, summary = await asyncio.to_thread(self._analyse, mask, name, size)
        t3 = time.perf_counter()
        return JSONResponse(
            {
                "image": name,
                "shape": list(image.shape),
                "pixel_size_nm": size,
                "pixel_size_from": origin,
                "particles": particles,
                "summary": summary,
                "model": self._model_tag,
                "timing_ms": {
                    "decode": round((t1 - t0) * 1e3, 2),
                    "inference": round((t2 - t1) * 1e3, 2),
                    "analysis": round((t3 - t2) * 1e3, 2),
                    "total": round((t3 - t0) * 1e3, 2),
                },
                "batch_size": batch_size,
            }
        )

    # -- routes -----------------------------------------------------------------------------------------------
    @app.post(
        f"{API_PREFIX}/segment",
        # FastAPI documents the multipart form from the File/Form parameters; the raw body is added here.
        openapi_extra={"requestBody": {"content": {"application/octet-stream": _RAW_BODY}}},
        response_model=SegmentResult,
        responses={
            200: {"content": {"image/png": {}}, "description": "JSON result, or the mask with ?mask=png"},
            400: {"model": ErrorBody, "description": "not an image, truncated, empty, bad parameter"},
            413: {
                "model": ErrorBody,
                "description": "too many bytes or pixels (serve.max_upload_bytes/max_pixels)",
            },
            415: {"model": ErrorBody, "description": "unsupported format"},
            503: {"description": "overloaded (serve.max_queued_requests): retry after Retry-After seconds"},
            504: {"model": ErrorBody, "description": "not answered within serve.request_timeout_s"},
        },
    )
    async def segment(
        self,
        request: Request,
        file: UploadFile | None = File(None, description="PNG, JPEG, TIFF, DM3/DM4 or EMD"),
        form_pixel_size_nm: float | None = Form(
            None, alias="pixel_size_nm", gt=0, description="nm per pixel (overrides the file's)"
        ),
        pixel_size_nm: float | None = Query(None, gt=0, description="nm per pixel; overrides the file's"),
        mask: Literal["png"] | None = Query(None, description="'png': return the binary mask as a PNG"),
        filename: str | None = Query(
            None, description="name of a raw-body upload (only its extension is used)"
        ),
    ):
        """Segment one micrograph (multipart field ``file`` or the raw body)."""
        size = pixel_size_nm if pixel_size_nm is not None else form_pixel_size_nm
        try:
            return await self._segment(request, file, size, mask == "png", filename)
        except RequestError as exc:
            return error_response(exc.status, exc.reason)
        except Exception as exc:  # noqa: BLE001 - nothing a request does may take the replica down
            _log.exception("segment request failed")
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get(f"{API_PREFIX}/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the replica is up and its model is loaded."""
        return {"status": "ok", "replica": self._replica, **self._model_tag}

    @app.get(f"{API_PREFIX}/model", response_model=ModelInfo)
    async def model(self) -> dict[str, Any]:
        """The served model: registry name and version, training run, architecture."""
        return self.info


# ---------------------------------------------------------------------------------------------- starting it


def deployment_options(cfg: Config, gpus_available: float | None = None) -> dict[str, Any]:
    """Replica count or autoscaling bounds, resources and concurrency from ``cfg.serve``.

    Args:
        cfg: the config.
        gpus_available: GPUs in the Ray cluster; 0 turns GPU replicas into CPU replicas (None: as configured).
    """
    s = cfg.serve
    gpus = s.gpus_per_replica if (gpus_available is None or gpus_available > 0) else 0.0
    if gpus != s.gpus_per_replica:
        _log.warning(
            "serve.gpus_per_replica=%s but the cluster has no GPU: serving from CPU replicas",
            s.gpus_per_replica,
        )
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": gpus},
        # A batch can only fill if that many requests may be in the replica at once.
        "max_ongoing_requests": max(s.max_ongoing_requests, s.max_batch_size),
        # Past that, the proxy queues this many and refuses the rest with 503. Since Ray 2.60 Serve's own
        # refusal carries Retry-After (BackpressureConfig), so no middleware of ours has to add it.
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s),
    }
    if s.min_replicas == s.max_replicas:  # num_replicas and autoscaling_config exclude each other
        options["num_replicas"] = s.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    return options


def proxy_timeout_s(cfg: Config) -> float:
    """The HTTP proxy's end-to-end cut-off (408): a little after the replica's own deadline (504, JSON), so the
    replica answers first when it has the request, and a request stuck queued before any replica is still cut."""
    return round(cfg.serve.request_timeout_s * 1.1 + 2.0, 3)


def build_app(model_uri: str, cfg: Config, gpus_available: float | None = None, **service_kwargs):
    """The Serve application for ``model_uri`` (not started): ``serve.run(build_app(...))``."""
    options = deployment_options(cfg, gpus_available)
    return SegmentationService.options(**options).bind(
        model_uri, cfg.model_dump(mode="json"), **service_kwargs
    )


def serve_model(model: str, cfg: Config, blocking: bool = True, name: str = "tgan") -> str:
    """Start the segmentation endpoint on local Ray (or the cluster at ``cfg.ray.address``).

    The model is resolved here first, so a wrong path or URI fails in seconds with one line, before Serve starts.
    On a multi-node cluster a local checkpoint path must exist on every node: prefer ``s3://`` or ``models:/``.

    Args:
        model: checkpoint path, ``s3://`` URI or ``models:/<name>/<version>``.
        cfg: config; ``cfg.serve`` sets host, port, replicas, resources and limits.
        blocking: serve until Ctrl-C (then delete the application); False returns once it is up.
        name: Serve application name.

    Returns:
        The endpoint's base URL, e.g. ``http://127.0.0.1:8000``.
    """
    source = resolve_model(model, cfg)
    remote = model.startswith("models:/") or "://" in model
    uri = model if remote else source.path  # replicas resolve it again (cached per node); paths made absolute
    if model.startswith("models:/"):  # replicas must reach the same registry, even without the env variable
        cfg = cfg.model_copy(deep=True)
        cfg.tracking.tracking_uri = _tracking_uri(cfg, model)
    from tgan_ray.runtime import init_ray

    ray = init_ray(cfg.ray)
    serve.start(
        http_options={
            "host": cfg.serve.host,
            "port": cfg.serve.port,
            "request_timeout_s": proxy_timeout_s(cfg),
        }
    )
    gpus = ray.cluster_resources().get("GPU", 0.0)
    serve.run(build_app(uri, cfg, gpus_available=gpus), name=name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    url = f"http://{host}:{cfg.serve.port}"
    _log.info("serving %s (version %s) at %s%s/segment", source.name, source.version, url, API_PREFIX)
    if blocking:
        print(f"serving {source.name} (version {source.version}) at {url}{API_PREFIX}/segment; Ctrl-C stops")
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            serve.delete(name)
    return url
