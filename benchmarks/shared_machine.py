"""The default training run on a shared machine: how much one competing CPU-bound process costs.

Runs `swinx train` (the MNIST preset) for a few epochs three times:
  quiet       nothing else running, default threads;
  busy        with a competitor this script starts, default threads (they follow the load);
  busy-fixed  the same competitor, threads fixed at the core count (what torch does by itself).
The competitor is one process spinning in Python (`--competitor spin`) or doing single-threaded
float32 matmuls (`--competitor matmul`). Reported: seconds per epoch (median of the epochs) and
each run's slowdown against the quiet one; rows go to benchmarks/results/shared_machine.csv.

    python benchmarks/shared_machine.py [--epochs 3] [--competitor spin|matmul]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from swinx.tools.bench import append_csv
from swinx.tools.host import host_info, host_line, host_slug

RESULTS = Path(__file__).resolve().parent / "results" / "shared_machine.csv"
COMPETITORS = {
    "spin": "while True: pass",
    "matmul": "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True: a @ a",
}


def train_epochs(out: Path, epochs: int, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "swinx", "train", "--epochs", str(epochs), "--out", str(out), "--progress", "off"]
    subprocess.run(cmd + extra, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--competitor", choices=sorted(COMPETITORS), default="spin")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cores = host_info()["cores"]
    print(host_line())
    runs = [("quiet", False, []), ("busy", True, []), ("busy-fixed", True, ["--threads", str(cores)])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, busy, extra in runs:
            competitor = None
            if busy:
                competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[args.competitor]])
                time.sleep(0.5)
            try:
                metrics = train_epochs(Path(tmp) / name, args.epochs, extra)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            seconds = [m["epoch_seconds"] for m in metrics]
            rows.append(
                {
                    "run": name,
                    "competitor": args.competitor if busy else "",
                    "epoch_seconds": round(statistics.median(seconds), 2),
                    "epochs_seconds": " ".join(f"{s:.2f}" for s in seconds),
                    "threads_at_end": metrics[-1].get("threads"),
                    "val_acc1": metrics[-1]["val_acc1"],
                }
            )
    quiet = rows[0]["epoch_seconds"]
    stamp = time.strftime("%Y-%m-%d %H:%M")
    for row in rows:
        row["slowdown"] = round(row["epoch_seconds"] / quiet, 2)
        row.update(date=stamp, host=host_line(), host_slug=host_slug(), epochs=args.epochs)
        print(
            f"  {row['run']:11s} {row['epoch_seconds']:6.2f} s/epoch ({row['epochs_seconds']})  "
            f"x{row['slowdown']:.2f} of quiet  threads at the end {row['threads_at_end']}"
        )
    append_csv(args.out, rows)
    print(f"appended to {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
