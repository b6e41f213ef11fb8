"""The HTTP inference server behind `swinx serve`: FastAPI under uvicorn, one model, dynamic batching.

Endpoints: POST /predict (a multipart upload in the field "file", or the image as the raw body),
GET /health, /ready, /model, /metrics (Prometheus text), and FastAPI's /docs and /openapi.json.
What protects the process: an upload byte limit (413), a pixel limit checked from the image
header before anything is decoded (413), a bounded queue (503 with Retry-After), a per-request
timeout (504), and 400 with the reason for anything that is not a readable image. With a token
set, every endpoint but /health and /ready wants `Authorization: Bearer <token>` (401).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError

from swinx.engine.data import READ_ERRORS, open_image
from swinx.serve.batching import DynamicBatcher, QueueFull, ShuttingDown
from swinx.serve.tasks import Served

PAGE = Path(__file__).parent / "page.html"


@dataclass
class ServeSettings:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout: float = 30.0  # seconds a request may wait for its answer
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    token: str | None = None


class Refused(Exception):
    """A request answered with an error status and a message."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def decode(data: bytes, channels: int, max_pixels: int) -> Image.Image:
    """An uploaded image, its size checked from the header before it is decoded."""
    if not data:
        raise Refused(400, "empty body: send an image as the request body or as a multipart field named 'file'")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as e:
        raise Refused(413, f"image refused before decoding: {e}") from None
    except UnidentifiedImageError:
        raise Refused(
            400, "not an image: Pillow recognises no image format in the body (send JPEG, PNG, WebP, ...)"
        ) from None
    except READ_ERRORS as e:
        raise Refused(400, f"not a readable image ({type(e).__name__}: {e})") from None
    if width * height > max_pixels:
        raise Refused(413, f"image of {width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,}")
    try:
        return open_image(io.BytesIO(data), channels)
    except READ_ERRORS as e:
        raise Refused(400, f"cannot decode the image, it may be truncated ({type(e).__name__}: {e})") from None


class Metrics:
    """Prometheus counters and histograms of one app (its own registry)."""

    def __init__(self, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("swinx_requests", "requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)  # fmt: skip
        self.latency = Histogram(
            "swinx_request_seconds",
            "time from receiving a /predict request to answering it",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.batch = Histogram("swinx_batch_size", "images per model call", buckets=buckets, registry=self.registry)
        self.queue = Gauge("swinx_queue_depth", "requests waiting for a batch", registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_app(served: Served, settings: ServeSettings | None = None):
    """The FastAPI app serving `served` (tasks.load_served: a classifier, detector or segmenter)."""
    settings = settings or ServeSettings()
    metrics = Metrics(settings.max_batch)
    batcher = DynamicBatcher(
        served.run, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue, on_batch=metrics.batch.observe
    )
    metrics.queue.set_function(lambda: batcher.depth)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.close()  # uvicorn has stopped accepting and waited for the open requests

    app = FastAPI(title="swinx", summary="Swin Transformer inference", lifespan=lifespan)

    @app.exception_handler(Refused)
    async def refused(request: Request, error: Refused):
        metrics.requests.labels(request.url.path, str(error.status)).inc()
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    def authorise(request: Request) -> None:
        if settings.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.token}".encode()):
            raise Refused(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                          {"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def read_upload(request: Request) -> tuple[bytes, str]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_bytes:
            raise Refused(413, f"upload of {int(length):,} bytes is over the limit of {settings.max_bytes:,}")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=4, max_part_size=settings.max_bytes)
            except Exception as e:  # starlette's MultiPartException and friends
                raise Refused(400, f"cannot read the multipart form: {e}") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise Refused(400, "the multipart form has no file field named 'file'")
            data = await upload.read()
            if len(data) > settings.max_bytes:
                raise Refused(413, f"upload of {len(data):,} bytes is over the limit of {settings.max_bytes:,}")
            return data, upload.filename or "upload"
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_bytes:
                raise Refused(413, f"upload is over the limit of {settings.max_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks), request.query_params.get("name", "upload")

    @app.post("/predict", summary="one image's prediction (multipart field 'file', or the raw body)")
    async def predict(request: Request):
        """A classifier answers {"image", "top": [{"class", "index", "probability"}, ...]} (as `swinx predict
        --json`), a detector {"image", "width", "height", "detections": [{"class", "label", "score",
        "box"}]}, a segmenter {"image", "width", "height", "classes": {name: percent}, "mask_png"}."""
        started = time.perf_counter()
        authorise(request)
        data, name = await read_upload(request)
        image = await asyncio.to_thread(decode, data, served.channels, settings.max_pixels)
        tensor = await asyncio.to_thread(served.preprocess, image)
        try:
            future = batcher.submit(tensor)
        except QueueFull as e:
            raise Refused(503, f"busy: {e}; try again shortly", {"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise Refused(503, str(e), {"Retry-After": "5"}) from None
        try:
            output = await asyncio.wait_for(future, settings.timeout)
        except TimeoutError:
            raise Refused(504, f"no answer within {settings.timeout:g} s") from None
        answer = await asyncio.to_thread(served.answer, output, name, image.size)
        metrics.latency.observe(time.perf_counter() - started)
        metrics.requests.labels("/predict", "200").inc()
        return answer

    def viz_image(data: bytes) -> Image.Image:
        """An upload for the pictures: a classifier's at its input size, a dense model's at most 448 px."""
        image = decode(data, served.channels, settings.max_pixels)
        if served.task == "classification":
            side = served.loaded.input["img_size"]
            return image.resize((side, side), Image.BILINEAR)
        scale = min(1.0, 448 / max(image.size))
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)

    def png(draw) -> Response:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = draw(Path(folder) / "picture.png")
            return Response(path.read_bytes(), media_type="image/png")

    @app.post("/viz/windows", summary="the image with a stage's window grid, regular and shifted (PNG)")
    async def viz_windows(request: Request, stage: int = 0):
        """`stage`: from 1; 0 draws every stage."""
        from swinx.tools.viz import draw_windows

        authorise(request)
        if not 0 <= stage <= len(served.config.depths):
            raise Refused(400, f"stage must be 1-{len(served.config.depths)}, or 0 for every stage")
        data, _ = await read_upload(request)
        image = await asyncio.to_thread(viz_image, data)
        stages = [stage] if stage else None
        return await asyncio.to_thread(png, lambda out: draw_windows(image, out, served.config, dpi=110, stages=stages))

    @app.post("/viz/attention", summary="one token's attention in a block, stitched back onto the image (PNG)")
    async def viz_attention(request: Request, stage: int = 1, block: int = 0, y: float = 0.5, x: float = 0.5):
        """`y`, `x`: where the token is, as fractions of the image's height and width (a click)."""
        from swinx.tools.viz import draw_attention, stage_layouts

        authorise(request)
        if served.task != "classification":
            raise Refused(400, f"attention pictures are drawn for classifiers; this server runs a {served.task} model")
        config = served.config
        if not 1 <= stage <= len(config.depths) or not 0 <= block < config.depths[stage - 1]:
            raise Refused(400, f"stage must be 1-{len(config.depths)} and block 0-{config.depths[stage - 1] - 1}")
        if not (0 <= y <= 1 and 0 <= x <= 1):
            raise Refused(400, "y and x are fractions of the image's height and width, from 0 to 1")
        data, _ = await read_upload(request)
        image = await asyncio.to_thread(viz_image, data)
        layout = stage_layouts(config, image.size[::-1])[stage - 1]
        row, col = min(int(y * layout.height), layout.height - 1), min(int(x * layout.width), layout.width - 1)
        response = await asyncio.to_thread(
            png, lambda out: draw_attention(served.loaded, image, out, stage, block, None, (row, col), dpi=90)
        )
        response.headers["X-Token"] = f"{row},{col}"
        response.headers["X-Token-Map"] = f"{layout.height}x{layout.width}"
        return response

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/health", summary="the process is up")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="the model is loaded and requests are taken")
    async def ready():
        if not state["ready"]:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "queue": batcher.depth}

    @app.get("/model", summary="the model's config, classes and preprocessing")
    async def model_info(request: Request):
        authorise(request)
        serving = {k: v for k, v in asdict(settings).items() if k != "token"}
        return {"task": served.task, "classes": served.classes, **served.info, "serving": serving}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_text(request: Request):
        authorise(request)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    app.state.batcher, app.state.metrics = batcher, metrics
    return app


def run_server(app, host: str, port: int, graceful_seconds: int = 30) -> None:
    """Serve `app` under uvicorn until SIGTERM or Ctrl-C: stop accepting, answer every request already
    taken (the batcher drains its queue), return. uvicorn re-raises the signal that stopped it after a
    clean shutdown, so the process would die of it; here a stop that was asked for ends with exit 0."""
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # handled: shut down cleanly, nothing to re-raise

    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=graceful_seconds, log_level="warning")
    Server(config).run()
