"""`swinx serve`: the real server (uvicorn, a free loopback port, a subprocess) answered over HTTP:
predictions equal to `swinx predict`'s, dynamic batches equal to one-by-one inference, every kind of
bad input refused with its status and reason, a flood refused with 503 while the server stays up,
a token enforced, SIGTERM under load answering every accepted request before exiting 0."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

import swinx
from helpers import randomize
from swinx.classification.inference import load_for_inference, predict

CLASSES = ["ant", "bee", "cat", "dog"]
SPEC = {
    "img_size": 32,
    "channels": 3,
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = swinx.create_model("swin_t", embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, img_size=32,
                               num_classes=4)  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    swinx.save_model(randomize(model).eval(), path, CLASSES, {"input": json.dumps(SPEC)})
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, size in enumerate([(32, 32), (40, 56), (75, 20), (32, 32), (64, 48), (33, 31)] * 4):
        g = torch.Generator().manual_seed(i)
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
        path = folder / f"{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, *flags: str):
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "swinx", "serve", "--checkpoint", str(checkpoint), "--port", str(self.port)]
        self.process = subprocess.Popen([*command, "--threads", "1", *flags], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stdout.read()}")
            try:
                if self.request("GET", "/ready")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("server did not become ready in 120 s")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
            return response.status, data, dict(response.getheaders())
        finally:
            connection.close()

    def predict(self, data: bytes, headers: dict | None = None, name: str = "x.png"):
        status, body, head = self.request("POST", f"/predict?name={name}", data, headers)
        return status, json.loads(body), head

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


@contextmanager
def serving(checkpoint: Path, *flags: str):
    server = Server(checkpoint, *flags)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(checkpoint):
    with serving(checkpoint, "--max-wait-ms", "50", "--max-bytes", "300000", "--token", "s3cret") as s:
        yield s


AUTH = {"Authorization": "Bearer s3cret"}


def multipart(data: bytes, name: str) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def expected(checkpoint: Path, paths: list[Path]) -> list[list[dict]]:
    return [r["top"] for r in predict(load_for_inference(checkpoint), paths, topk=5)]


def same_top(a: list[dict], b: list[dict]) -> bool:
    return [t["class"] for t in a] == [t["class"] for t in b] and all(
        abs(x["probability"] - y["probability"]) < 1e-5 for x, y in zip(a, b)
    )


def test_predict_equals_swinx_predict(server, checkpoint, images):
    want = expected(checkpoint, images[:2])
    status, out, _ = server.predict(images[0].read_bytes(), AUTH, "00.png")
    assert status == 200 and out["image"] == "00.png" and same_top(out["top"], want[0])
    body, headers = multipart(images[1].read_bytes(), "one.png")
    status, out, _ = server.predict(body, {**AUTH, **headers})
    assert status == 200 and out["image"] == "one.png" and same_top(out["top"], want[1])
    assert {t["class"] for t in out["top"]} == set(CLASSES)


def test_concurrent_requests_are_batched_and_equal_one_by_one(server, checkpoint, images):
    want = expected(checkpoint, images)
    before = metric(server, "swinx_batch_size_count")
    results = [None] * len(images)

    def call(i):
        results[i] = server.predict(images[i].read_bytes(), AUTH)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r[0] == 200 for r in results), [r[:2] for r in results if r[0] != 200]
    assert all(same_top(r[1]["top"], w) for r, w in zip(results, want))
    batches = metric(server, "swinx_batch_size_count") - before
    assert batches < len(images), "no two of 24 simultaneous requests shared a batch"


def metric(server, name: str) -> float:
    text = server.request("GET", "/metrics", headers=AUTH)[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height gray pixels, with only a few rows of data (tiny file)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "case,status,reason",
    [
        ("empty", 400, "empty body"),
        ("text", 400, "not an image"),
        ("truncated", 400, "truncated"),
        ("bomb", 413, "pixels"),
        ("too_big", 413, "over the limit of 300,000"),
    ],
)
def test_bad_input_is_refused_with_the_reason(server, images, case, status, reason):
    png = images[4].read_bytes()
    body = {
        "empty": b"",
        "text": b"hello, this is not an image\n" * 10,
        "truncated": png[: len(png) // 2],
        "bomb": png_bomb(20_000, 20_000),
        "too_big": os.urandom(400_000),
    }[case]
    before = server.rss_kib()
    got, out, _ = server.predict(body, AUTH)
    assert got == status and reason in out["error"], out
    if case == "bomb":
        assert len(body) < 10_000 and server.rss_kib() - before < 100_000  # 400 M pixels were never allocated
    assert server.request("GET", "/health")[0] == 200


def test_token(server, images):
    status, out, head = server.predict(images[0].read_bytes())
    assert status == 401 and "token" in out["error"] and head.get("www-authenticate") == "Bearer"
    assert server.predict(images[0].read_bytes(), {"Authorization": "Bearer wrong"})[0] == 401
    assert server.request("GET", "/model")[0] == 401
    assert server.request("GET", "/health")[0] == 200 and server.request("GET", "/ready")[0] == 200


def test_model_and_metrics_endpoints(server):
    status, body, _ = server.request("GET", "/model", headers=AUTH)
    info = json.loads(body)
    assert status == 200 and info["classes"] == CLASSES and info["preprocessing"] == SPEC
    assert "token" not in info["serving"] and info["serving"]["max_bytes"] == 300000
    text = server.request("GET", "/metrics", headers=AUTH)[1].decode()
    for name in (
        "swinx_requests_total",
        "swinx_request_seconds_bucket",
        "swinx_batch_size_bucket",
        "swinx_queue_depth",
    ):
        assert name in text
    assert server.request("GET", "/openapi.json")[0] == 200


def test_flood_past_the_queue_gets_503_and_the_server_recovers(checkpoint, images):
    with serving(checkpoint, "--max-batch", "1", "--max-queue", "2", "--max-wait-ms", "0") as server:
        data = images[4].read_bytes()
        for _ in range(8):  # warm up: the first requests allocate what every later one reuses
            server.predict(data)
        baseline = server.rss_kib()
        results = []
        lock = threading.Lock()

        def call():
            got = server.predict(data)
            with lock:
                results.append(got)

        for _ in range(3):
            threads = [threading.Thread(target=call) for _ in range(48)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert server.rss_kib() - baseline < 50_000  # the queue is bounded: 144 requests leave no trace
        codes = [r[0] for r in results]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
        busy = next(r for r in results if r[0] == 503)
        assert busy[2].get("retry-after") == "1" and "busy" in busy[1]["error"]
        assert server.request("GET", "/health")[0] == 200
        assert server.predict(data)[0] == 200


def test_sigterm_under_load_answers_every_accepted_request(checkpoint, images):
    server = Server(checkpoint, "--max-batch", "4")
    data = images[4].read_bytes()
    outcomes = []
    lock = threading.Lock()

    def call():
        try:
            got = server.predict(data)[0]
        except ConnectionRefusedError:
            got = "refused"  # not accepted: the server had stopped listening
        except OSError as e:
            got = f"dropped: {type(e).__name__}"
        with lock:
            outcomes.append(got)

    threads = [threading.Thread(target=call) for _ in range(32)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert server.process.wait(60) == 0
    assert all(o in (200, "refused") for o in outcomes), outcomes
    assert outcomes.count(200) > 0


# ----- detectors and segmenters ------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector_checkpoint(tmp_path_factory) -> Path:
    from swinx.detection.train import DetectConfig, build_detector, detector_spec, save_detector, scenes_preset

    spec = detector_spec(DetectConfig.from_dict(scenes_preset()), 3)
    spec["detector_args"].update(score_thresh=0.0, detections_per_img=5)  # a fresh head scores low: keep boxes
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("det") / "detector.safetensors"
    save_detector(build_detector(spec).eval(), path, spec, ["one", "two", "three"], {})
    return path


@pytest.fixture(scope="module")
def segmenter_checkpoint(tmp_path_factory) -> Path:
    from swinx.segmentation.train import SegmentConfig, build_segmenter, scenes_preset, segmenter_spec
    from swinx.weights.checkpoint import save_task_model

    spec = segmenter_spec(SegmentConfig.from_dict(scenes_preset()), 3)
    torch.manual_seed(0)
    meta = {"segmenter": json.dumps(spec), "classes": json.dumps(["sky", "sea", "sand"]),
            "palette": json.dumps([[0, 0, 255], [0, 128, 0], [255, 200, 0]])}  # fmt: skip
    path = tmp_path_factory.mktemp("seg") / "segmenter.safetensors"
    save_task_model(build_segmenter(spec).eval(), path, "segmentation", meta)
    return path


def concurrently(server, bodies: list[bytes]) -> list:
    results = [None] * len(bodies)

    def call(i):
        results[i] = server.predict(bodies[i], name=f"{i}.png")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_detector_boxes_batched_by_size_equal_one_by_one(detector_checkpoint, images):
    from swinx.serve.tasks import load_served

    local = load_served(str(detector_checkpoint), threshold=0.0)
    with serving(detector_checkpoint, "--max-wait-ms", "50", "--threshold", "0") as server:
        status, body, _ = server.request("GET", "/model")
        assert status == 200 and json.loads(body)["task"] == "detection"
        results = concurrently(server, [p.read_bytes() for p in images[:12]])
        batches = metric(server, "swinx_batch_size_count")
    assert all(r[0] == 200 for r in results)
    assert batches < 12  # same-size images shared batches (six sizes among the twelve)
    for path, (_, out, _) in zip(images[:12], results):
        image = Image.open(path).convert("RGB")
        want = local.answer(local.run([local.preprocess(image)])[0], out["image"], image.size)
        assert (out["width"], out["height"]) == image.size and len(out["detections"]) == 5
        for got, ref in zip(out["detections"], want["detections"]):
            assert got["class"] == ref["class"] and abs(got["score"] - ref["score"]) < 1e-3
            assert max(abs(a - b) for a, b in zip(got["box"], ref["box"])) < 0.2


def test_segmenter_mask_png_at_the_image_size(segmenter_checkpoint, images):
    import base64
    import io

    from swinx.serve.tasks import load_served

    local = load_served(str(segmenter_checkpoint))
    with serving(segmenter_checkpoint, "--max-wait-ms", "50") as server:
        results = concurrently(server, [p.read_bytes() for p in images[:6]])
    for path, (status, out, _) in zip(images[:6], results):
        assert status == 200
        image = Image.open(path).convert("RGB")
        mask = Image.open(io.BytesIO(base64.b64decode(out["mask_png"])))
        assert mask.mode == "P" and mask.size == image.size == (out["width"], out["height"])
        want = local.run([local.preprocess(image)])[0]
        assert torch.equal(torch.as_tensor(list(mask.getdata())).view(want.shape), want.long())
        assert abs(sum(out["classes"].values()) - 100) < 0.1 and set(out["classes"]) <= {"sky", "sea", "sand"}


def test_a_request_past_its_timeout_gets_504(checkpoint, images):
    """--timeout below the batching wait: the answer cannot come in time; 504 with the reason, and the
    server keeps serving (the late result is dropped, not sent to anyone)."""
    with serving(checkpoint, "--timeout", "0.01", "--max-wait-ms", "200") as server:
        status, out, _ = server.predict(images[0].read_bytes())
        assert status == 504 and "no answer within 0.01 s" in out["error"]
        assert server.request("GET", "/health")[0] == 200
