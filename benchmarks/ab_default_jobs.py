"""The default jobs, before and after: epoch throughput and accuracy of two source trees in one command.

Each job runs as the user would start it (`swinx train`, `swinx detect train`, `swinx segment
train`, the built-in data and presets), once from a checkout of `--before` (a git revision,
checked out into a temporary worktree) and once from this tree, one after the other. Reported:
training images per second (median over the epochs), the last epoch's validation score, and
the ratio after / before; rows go to benchmarks/results/default_jobs.csv.

    python benchmarks/ab_default_jobs.py --before 8329981 [--jobs classify detect segment] [--epochs N] [--rounds R]

With --rounds R the pair runs R times, before-after then after-before and so on, so that a host
whose speed drifts during the runs (a shared machine) weighs on both trees alike; each round's ratio
and their median are printed.
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
from swinx.tools.host import host_line, host_slug

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "default_jobs.csv"
JOBS = {  # command, validation score key
    "classify": (["train"], "val_acc1"),
    "detect": (["detect", "train"], "val_AP"),
    "segment": (["segment", "train"], "val_mIoU"),
}


def run_job(src: Path, job: str, out: Path, epochs: int | None) -> list[dict]:
    command, _ = JOBS[job]
    cmd = [sys.executable, "-m", "swinx", *command, "--out", str(out), "--progress", "off"]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    env = dict(os.environ, PYTHONPATH=str(src))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    if done.returncode != 0:
        raise SystemExit(f"{job} from {src} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def score(rows: list[dict], key: str):
    """The last validation score in the run (dense jobs score every few epochs only)."""
    return next((row[key] for row in reversed(rows) if row.get(key) is not None), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of the 'before' tree")
    parser.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=["classify"])
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the preset's)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="before/after pairs, in ABBA order; the median ratio is reported"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(host_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True,
                       capture_output=True)  # fmt: skip
        try:
            git = ["git", "-C", str(ROOT)]
            commit = subprocess.run(
                [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            if subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip():
                commit += "+uncommitted changes"
            trees = (("before", before / "src"), ("after", ROOT / "src"))
            for job in args.jobs:
                for round_ in range(args.rounds):  # ABBA...: the host's drift falls on both trees alike
                    for label, src in trees if round_ % 2 == 0 else trees[::-1]:
                        rows.append(run_row(job, label, src, Path(tmp) / f"{job}-{label}-{round_}", args, commit))
                        rows[-1]["round"] = round_
                        print(f"  {job:8s} {label:6s} {rows[-1]}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    for job in args.jobs:
        ratios = []
        for round_ in range(args.rounds):
            pair = [r for r in rows if r["job"] == job and r["round"] == round_]
            b, a = (next(r for r in pair if r["tree"] == tree) for tree in ("before", "after"))
            a["speedup"] = round(a["images_per_second"] / b["images_per_second"], 2)
            ratios.append(a["speedup"])
            print(
                f"{job} round {round_ + 1}: {b['images_per_second']} -> {a['images_per_second']} img/s "
                f"({a['speedup']:.2f}x), {b['score_key']} {b['score']} -> {a['score']}"
            )
        if args.rounds > 1:
            print(f"{job}: median over {args.rounds} rounds {statistics.median(ratios):.2f}x (each {ratios})")
    for row in rows:
        row.pop("round")
        row.update(date=stamp, host=host_line(), host_slug=host_slug())
    append_csv(args.out, rows)
    print(f"appended to {args.out}")


def run_row(job: str, label: str, src: Path, out: Path, args, commit: str) -> dict:
    """One run of `job` from the source tree `src`, as a results row."""
    started = time.perf_counter()
    metrics = run_job(src, job, out, args.epochs)
    speed = statistics.median(m["images_per_second"] for m in metrics)
    return {
        "job": job,
        "tree": label,
        "revision": args.before if label == "before" else commit,
        "epochs": len(metrics),
        "images_per_second": round(speed, 1),
        "epoch_seconds": round(statistics.median(m["epoch_seconds"] for m in metrics), 2),
        "score": score(metrics, JOBS[job][1]),
        "score_key": JOBS[job][1],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    main()
