"""Load on `swinx serve`: N concurrent clients on loopback, dynamic batching against batch-1 serving.

    python benchmarks/serve_bench.py [--checkpoint CKPT | --detector] [--clients 32] [--requests 960] [--threads 2]

Starts the real server (a subprocess, a free loopback port) twice on the same checkpoint: with
dynamic batching (--max-batch 32, --max-wait-ms 5) and with batches of one (--max-batch 1). Each
time, `--clients` threads with keep-alive connections send `--requests` uploads in all (the
fixture digits, in turn) as fast as answers come. Reports throughput, p50/p95/p99 latency, the
mean batch size (from /metrics), failed requests, and the throughput ratio; writes a CSV row per
mode to benchmarks/results/serve.csv. Bounded in requests; loopback only. `--detector` serves the
digit-scenes preset's FCOS detector (untrained weights: the speed of the network and its
post-processing, not of a trained model's boxes) on 256x256 scene-sized images.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from swinx.tools.host import host_line

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def metric(port: int, name: str) -> float:
    text = get(port, "/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def start(checkpoint: Path, threads: int, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "swinx", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen([*command, "--threads", str(threads), "--max-queue", "1024", *flags], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if get(port, "/ready")[0] == 200:
                return process, port
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("the server did not become ready")


def load(port: int, bodies: list[bytes], clients: int, requests: int) -> dict:
    latencies, failures, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for i in counter:  # shared iterator: every request is sent exactly once
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=bodies[i % len(bodies)])
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError as e:
                ok, response = False, e
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                (latencies if ok else failures).append(time.perf_counter() - started if ok else str(response))
        connection.close()

    pool = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": requests,
        "failed": len(failures),
        "seconds": round(seconds, 2),
        "throughput": round(len(latencies) / seconds, 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p95_ms": round(q[94] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
    }


def measure(checkpoint: Path, bodies, clients, requests, threads, mode: str) -> dict:
    flags = ["--max-batch", "32", "--max-wait-ms", "5"] if mode == "dynamic" else ["--max-batch", "1"]
    process, port = start(checkpoint, threads, *flags)
    try:
        load(port, bodies, clients, min(requests, 4 * clients))  # warm-up
        before = metric(port, "swinx_batch_size_sum"), metric(port, "swinx_batch_size_count")
        row = load(port, bodies, clients, requests)
        after = metric(port, "swinx_batch_size_sum"), metric(port, "swinx_batch_size_count")
        row["mean_batch"] = round((after[0] - before[0]) / max(after[1] - before[1], 1), 2)
    finally:
        process.send_signal(signal.SIGTERM)
        row["exit_code"] = process.wait(60)
    return {"mode": mode, "clients": clients, **row}


def untrained_detector() -> Path:
    import tempfile

    from swinx.detection.train import DetectConfig, build_detector, detector_spec, save_detector, scenes_preset

    spec = detector_spec(DetectConfig.from_dict(scenes_preset()), 10)
    path = Path(tempfile.mkdtemp()) / "detector.safetensors"
    save_detector(build_detector(spec).eval(), path, spec, [str(d) for d in range(10)], {})
    return path


def scene_images(count: int = 8, side: int = 256) -> list[bytes]:
    """Scene-sized PNGs: the fixture digits tiled on a 256x256 canvas."""
    import io

    from PIL import Image

    digits = [Image.open(p).convert("RGB") for p in sorted(FIXTURES.glob("digit*.png"))]
    out = []
    for i in range(count):
        canvas = Image.new("RGB", (side, side), (235, 235, 235))
        for j in range(6):
            canvas.paste(
                digits[(i + j) % len(digits)], ((37 * (i + 3 * j)) % (side - 32), (53 * (i + j)) % (side - 32))
            )
        buffer = io.BytesIO()
        canvas.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=FIXTURES / "digits32.safetensors")
    parser.add_argument("--detector", action="store_true", help="serve the scenes preset's detector instead")
    parser.add_argument("--images", type=Path, nargs="+", default=sorted(FIXTURES.glob("digit*.png")))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=960)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.csv"), help="CSV ('': none)")
    args = parser.parse_args()
    bodies = [p.read_bytes() for p in args.images]
    if args.detector:
        args.checkpoint, bodies = untrained_detector(), scene_images()
    rows = [
        measure(args.checkpoint, bodies, args.clients, args.requests, args.threads, m) for m in ("batch1", "dynamic")
    ]
    ratio = rows[1]["throughput"] / rows[0]["throughput"]
    host = host_line()
    for row in rows:
        row.update(checkpoint=args.checkpoint.name, host=host, cores=os.cpu_count(), ratio=round(ratio, 2))
        print(json.dumps(row))
    print(f"dynamic batching / batch-1 throughput: {ratio:.2f}x at {args.clients} clients")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.exists()
        with open(out, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
