"""Benchmarks and cost models: the analytic MACs, the counted FLOPs, the peers, and that the
benchmark commands run end to end.

Nothing here asserts a time or a speed ratio: on a shared machine those mean nothing in a test.
What is checked is that timings are produced (positive, one per round, rotated), that every
implementation computes the same function, and that the numbers reported follow the published ones.
"""

from __future__ import annotations

import csv
import math
import time

import pytest
import torch

import swinx
from helpers import one_thread, randomize  # noqa: F401 - one_thread is used through pytestmark
from swinx.cli import main
from swinx.tools import bench, flops

TINY = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
PARTS = ["patch_embed", "stage1", "stage2", "stage3", "stage4", "head"]

# One intra-op thread: with two on this 2-core machine, any other process makes every OpenMP
# region wait on a descheduled thread (a full swin_t training step goes from ~1 s to ~30 s).
pytestmark = pytest.mark.usefixtures("one_thread")


def total_macs(config, size=None) -> int:
    return sum(p.macs for p in flops.macs(config, size))


# ---------------------------------------------------------------------------------------------
# Analytic MACs (the official convention)


@pytest.mark.parametrize(
    "name, overrides, published, half_unit",
    [
        ("swin_t", {}, 4.494e9, 0.005e9),  # 4.49G in the paper; 4.494G printed by the official code
        ("swin_s", {}, 8.7e9, 0.05e9),
        ("swin_b", {}, 15.4e9, 0.05e9),
        ("swin_b", {"img_size": 384, "window_size": 12}, 47.1e9, 0.05e9),
    ],
    ids=["swin_t", "swin_s", "swin_b", "swin_b_384"],
)
def test_macs_match_the_published_numbers(name, overrides, published, half_unit):
    config = swinx.get_config(name, **overrides)
    parts = flops.macs(config)
    assert [p.name for p in parts] == PARTS
    assert all(p.macs > 0 for p in parts)
    total = sum(p.macs for p in parts)
    assert abs(total - published) <= half_unit, total
    assert total == total_macs(config, config.img_size)  # the default size is the config's


def test_macs_parts_follow_the_maps():
    parts = flops.macs(swinx.get_config("swin_t"), 224)
    assert [(p.height, p.width) for p in parts] == [(56, 56), (56, 56), (28, 28), (14, 14), (7, 7), (7, 7)]
    # odd sizes are counted as the model runs them: maps round up
    parts = flops.macs(swinx.get_config("swin_t"), (200, 312))
    assert (parts[1].height, parts[1].width) == (50, 78)
    assert (parts[4].height, parts[4].width) == (7, 10)


def test_windowed_macs_grow_linearly_and_global_attention_faster():
    config = swinx.get_config("swin_t")
    ratio = total_macs(config, 448) / total_macs(config, 224)
    assert 3.9 < ratio < 4.1, ratio
    glob = total_macs(bench.global_attention(config, 448), 448) / total_macs(bench.global_attention(config, 224), 224)
    assert glob > 4.5, glob
    # at the same size, one window per map costs more than 7x7 windows
    assert total_macs(bench.global_attention(config, 448), 448) > total_macs(config, 448)


# ---------------------------------------------------------------------------------------------
# Counted FLOPs (torch.utils.flop_counter)


@pytest.mark.parametrize("size", [224, (200, 312)], ids=["224", "200x312"])
def test_counted_flops_agree_with_the_analytic_count(size):
    """Both conventions count the matmuls (linear layers, q @ k^T, attn @ v, the patch conv); the
    analytic one adds one MAC per LayerNorm element, so counted total = 2 x MACs within a few %.

    Every part must be seen: on the CPU, in no_grad, the model runs its linear layers through
    oneDNN (ops.linear) and its attention through SDPA's CPU kernel, and the counter has to
    count what the model does, not only the patch conv and the head. And each stage's patch
    merging belongs to that stage, although the model calls it outside SwinStage.forward.
    """
    model = randomize(swinx.create_model("swin_t", **TINY)).eval()
    counted = flops.counted_flops(model, size)
    analytic = {p.name: 2 * p.macs for p in flops.macs(model.config, size)}
    assert set(counted) == set(PARTS) | {"total"}, sorted(counted)
    assert sum(v for k, v in counted.items() if k != "total") <= counted["total"]
    ratio = counted["total"] / sum(analytic.values())
    assert 0.9 <= ratio <= 1.1, (ratio, counted, analytic)
    # Per stage, with its patch merging (both docstrings say so): only the norms differ, < 2% here.
    # Without the merging's 4C -> 2C matmul, stages 1-3 would read 0.87-0.93.
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        assert 0.95 <= counted[stage] / analytic[stage] <= 1.02, (stage, counted, analytic)
    assert model.training is False and all(b.attn.fused for b in model.blocks())  # left as it was


# ---------------------------------------------------------------------------------------------
# Peers with the same weights


@pytest.fixture(scope="module")
def swin_t_randomized():
    return randomize(swinx.create_model("swin_t"), seed=3).eval()


@pytest.mark.parametrize("impl", ["timm", "torchvision"])
def test_peers_compute_the_same_function(impl, swin_t_randomized):
    model = swin_t_randomized
    peer = bench.build(impl, model, "swin_t").eval()
    assert peer is not model and type(peer).__module__.split(".")[0] == impl
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = model(x), peer(x)
    assert ours.abs().max() > 0.5  # randomized: not a near-constant output
    assert (ours - theirs).abs().max().item() < 1e-4
    assert bench.build("swinx", model, "swin_t") is model


def test_build_rejects_unknown_implementations_and_names(swin_t_randomized):
    with pytest.raises(ValueError, match="unknown implementation 'tf'.*swinx, timm, torchvision or onnxruntime"):
        bench.build("tf", swin_t_randomized, "swin_t")
    with pytest.raises(ValueError, match="no timm counterpart of swin_x.*swin_t"):
        bench.build("timm", swin_t_randomized, "swin_x")
    with pytest.raises(ValueError, match="no torchvision counterpart of swin_l.*swin_t"):
        bench.build("torchvision", swin_t_randomized, "swin_l")  # torchvision has no Swin-L


# ---------------------------------------------------------------------------------------------
# compare(): every implementation, same weights, interleaved


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_compare_reports_every_implementation(mode, monkeypatch):
    # On the CPU the peak memory is the peak RSS of a fresh process per implementation
    # (process_peak_rss): 4-35 s per process on this shared 2-core machine, six of them here. It is
    # replaced by a recorder, to check that compare asks for it and reports it;
    # test_process_peak_rss below runs the real one once.
    asked = []

    def fake_rss(spec, impl):
        asked.append((spec.mode, spec.batch, spec.img_size, impl))
        return 100.0 + len(asked)

    monkeypatch.setattr(bench, "process_peak_rss", fake_rss)
    impls = ("swinx", "timm", "torchvision")
    spec = bench.BenchSpec(model="swin_t", batch=1, img_size=224, mode=mode, repeats=2, min_seconds=0.01, warmup=0)
    results = bench.compare(spec, impls, memory=True, roofline=1e11)
    assert [r.impl for r in results] == list(impls)
    assert results[0].speedup_of_swinx == 1.0
    for r in results:
        assert (r.model, r.mode, r.batch, r.img_size, r.dtype, r.compiled) == ("swin_t", mode, 1, 224, "float32", False)
        assert r.max_abs_diff is not None and r.max_abs_diff < 1e-4
        assert r.median_ms > 0 and r.images_per_second > 0 and len(r.rounds_ms) == 2
        assert all(t > 0 for t in r.rounds_ms)
        assert r.speedup_of_swinx > 0
        assert r.peak_memory_mb is not None and r.peak_memory_mb > 0
        assert r.gmacs_per_image == pytest.approx(4.494, abs=0.005)
        assert r.fraction_of_matmul_peak is not None and r.fraction_of_matmul_peak > 0
        row = r.row()
        assert row["impl"] == r.impl and isinstance(row["rounds_ms"], str)
    assert asked == [(mode, 1, 224, impl) for impl in impls]
    assert [r.peak_memory_mb for r in results] == [101.0, 102.0, 103.0]
    # one image-per-second figure is batch / median time, and the ratio is theirs / ours
    r = results[1]
    assert r.images_per_second == pytest.approx(1e3 / r.median_ms)
    assert r.speedup_of_swinx == pytest.approx(r.median_ms / results[0].median_ms)


def test_compare_without_memory_or_roofline(monkeypatch):
    monkeypatch.setattr(bench, "process_peak_rss", lambda *a: pytest.fail("memory=False must not measure memory"))
    monkeypatch.setattr(bench, "create_model", lambda name, **kw: swinx.create_model(name, **{**TINY, **kw}))
    spec = bench.BenchSpec(model="swin_t", batch=2, img_size=64, mode="infer", repeats=1, min_seconds=0.01, warmup=0)
    (result,) = bench.compare(spec, ("swinx",), memory=False)
    assert result.peak_memory_mb is None and result.fraction_of_matmul_peak is None
    assert result.max_abs_diff == 0.0 and result.batch == 2 and result.img_size == 64


def test_workload_rejects_an_unknown_mode():
    model = swinx.create_model("swin_t", **TINY)
    with pytest.raises(ValueError, match="infer or train"):
        bench.workload(model, bench.BenchSpec(mode="eval"), torch.zeros(1, 3, 32, 32), torch.zeros(1).long())


def test_train_workload_steps_the_weights():
    model = swinx.create_model("swin_t", **TINY, drop_path_rate=0.0)
    before = model.head.weight.detach().clone()
    step = bench.workload(
        model, bench.BenchSpec(mode="train", batch=2), torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    )
    loss = step()
    assert model.training and loss.requires_grad is True and torch.isfinite(loss)
    assert not torch.equal(model.head.weight, before)


# ---------------------------------------------------------------------------------------------
# Memory


@pytest.mark.slow
def test_process_peak_rss_measures_the_child_alone_and_grows_with_the_batch(monkeypatch):
    """A fresh process builds swin_t and runs three training steps at 128 x 128; its peak RSS is
    reported in MB: more than PyTorch plus 112 MB of float32 weights, their gradients and AdamW's
    two moments (~1.2-1.4 GB measured alone), and four images need more than one (~50 MB of
    saved activations each).

    The parent's own high-water mark must not leak in. On Linux, ru_maxrss carries over into an
    exec'd child (Python's subprocess vfork()s; at execve the kernel keeps the old, shared mm's
    peak): a child started by a parent that once held 2.3 GB reports 2.3 GB whatever it does
    itself. The child's own peak is VmHWM in /proc/self/status.
    """
    import resource

    big = torch.ones(int(2.25 * 2**30) // 4)  # the parent peaks at > 2.3 GB, then frees it
    del big
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 > 2300
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child processes: see pytestmark
    rss = {
        batch: bench.process_peak_rss(bench.BenchSpec(model="swin_t", batch=batch, img_size=128, mode="train"), "swinx")
        for batch in (1, 4)
    }
    assert all(400 < v < 2000 for v in rss.values()), rss
    assert rss[4] > rss[1] + 60, rss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_peak_memory_sees_a_freed_peak():
    device = torch.device("cuda")

    def fn():
        a = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
        del a
        return torch.empty(32 * 2**20, dtype=torch.uint8, device=device)

    assert 63 <= bench.cuda_peak_memory(fn, device) <= 66


# ---------------------------------------------------------------------------------------------
# Timing and recording


def test_interleaved_rotates_the_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    rounds = bench.interleaved(fns, torch.device("cpu"), repeats=4, min_seconds=0.0, warmup=1)
    assert set(rounds) == set("abc")
    assert all(len(times) == 4 and all(t >= 0 for t in times) for times in rounds.values())
    # warm-up (once each), one calibration call each, then one call per round (min_seconds 0)
    assert len(calls) == 3 + 3 + 4 * 3
    timed = calls[6:]
    assert [timed[i : i + 3] for i in range(0, 12, 3)] == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_interleaved_repeats_calls_to_fill_a_round(monkeypatch):
    """Each round runs ceil(min_seconds / one call) calls and reports seconds per call. A fake
    clock that advances 4 ms per call makes that exact: 3 calls per 10 ms round, 4 ms each."""
    from types import SimpleNamespace

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    calls = []

    def step():
        calls.append(1)
        clock.now += 0.004

    rounds = bench.interleaved({"step": step}, torch.device("cpu"), repeats=2, min_seconds=0.01, warmup=1)
    assert len(calls) == 1 + 1 + 2 * 3  # warm-up, calibration, 2 rounds of 3
    assert rounds["step"] == pytest.approx([0.004, 0.004])


def test_matmul_rate_measures_each_kernel():
    rates = bench.matmul_rate(torch.float32, "cpu", n=128, repeats=1)
    assert "torch.mm" in rates and all(r > 0 and math.isfinite(r) for r in rates.values())
    from swinx.model import ops

    assert ("oneDNN" in rates) == ops.HAS_ONEDNN_LINEAR


def test_record_writes_a_header_once_and_appends(tmp_path):
    rows = [
        {"impl": "swinx", "median_ms": 1.5, "rounds_ms": "1.40 1.50"},
        {"impl": "timm", "median_ms": 2.5, "rounds_ms": "2.40 2.50"},
    ]
    path = bench.record(rows, tmp_path, torch.device("cpu"))
    again = bench.record(rows[:1], tmp_path, torch.device("cpu"))
    assert again == path
    name = path.rsplit("/", 1)[-1]
    assert name.endswith(".csv") and "torch" in name and time.strftime("%Y-%m-%d") in name
    assert torch.__version__.split("+")[0] in name
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "impl,median_ms,rounds_ms" and lines.count(lines[0]) == 1
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert [r["impl"] for r in read] == ["swinx", "timm", "swinx"]
    assert read[1]["median_ms"] == "2.5" and read[0]["rounds_ms"] == "1.40 1.50"


# ---------------------------------------------------------------------------------------------
# The commands


def test_cli_flops(capsys):
    assert main(["flops", "swin_t"]) == 0
    out = capsys.readouterr().out
    assert "4.494 GMACs" in out and "28,288,354 parameters" in out
    for part in PARTS:
        assert part in out


def test_cli_flops_counted(capsys):
    assert main(["flops", "swin_t", "--counted", "--img-size", "96"]) == 0
    out = capsys.readouterr().out
    assert "flop_counter" in out and "torch.utils.flop_counter total" in out
    assert out.count("flop_counter ") >= len(PARTS)


@pytest.fixture
def fast_bench(monkeypatch):
    """The bench command without its slow parts, which are tested above on their own:
    matmul_rate (n=2048, two kernels, two dtypes, 5 rounds of >= 0.3 s each: many seconds, longer
    in bfloat16 without AMX) returns fixed rates, and the variant is built narrow (embed_dim 32)."""
    measured = []

    def fake_rate(dtype=torch.float32, device="cpu", n=2048, repeats=5):
        measured.append(dtype)
        return {"torch.mm": 40e9, "oneDNN": 80e9}

    monkeypatch.setattr(bench, "matmul_rate", fake_rate)
    monkeypatch.setattr(bench, "create_model", lambda name, **kw: swinx.create_model(name, **{**TINY, **kw}))
    return measured


def test_cli_bench_writes_a_csv(tmp_path, capsys, fast_bench):
    code = main(
        [
            "bench",
            "--model",
            "swin_t",
            "--batch",
            "1",
            "--repeats",
            "1",
            "--img-size",
            "64",
            "--out-dir",
            str(tmp_path),
            "--no-memory",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert fast_bench == [torch.float32, torch.bfloat16]
    assert "80.0 GFLOP/s" in out and "swinx" in out and "% of matmul peak" in out
    (csv_path,) = tmp_path.glob("*.csv")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    assert row["impl"] == "swinx" and row["mode"] == "infer" and row["batch"] == "1" and row["img_size"] == "64"
    assert float(row["median_ms"]) > 0 and float(row["matmul_gflops"]) == 80.0
    assert row["peak_memory_mb"] == ""  # --no-memory


def test_cli_bench_scaling_draws_the_plot(tmp_path, capsys, fast_bench):
    from PIL import Image

    code = main(
        ["bench", "--scaling", "--model", "swin_t", "--sizes", "64", "96", "--repeats", "1", "--out-dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    png = tmp_path / "scaling-swin_t.png"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 500
    lines = [line for line in out.splitlines() if line.strip().endswith("GMACs")]
    assert len(lines) == 2 and lines[0].lstrip().startswith("64px") and lines[1].lstrip().startswith("96px")
    assert f"wrote {png}" in out


def test_scaling_rows(monkeypatch):
    # narrow variant for speed (the full swin_t is built three times otherwise)
    monkeypatch.setattr(bench, "create_model", lambda name, **kw: swinx.create_model(name, **{**TINY, **kw}))
    rows = bench.scaling("swin_t", sizes=(64, 96), measured_global_max=64, repeats=1)
    config = swinx.get_config("swin_t", **TINY)
    assert [r["img_size"] for r in rows] == [64, 96] and [r["tokens"] for r in rows] == [256, 576]
    for r in rows:
        assert r["swin_gmacs"] * 1e9 == pytest.approx(total_macs(config, r["img_size"]))
        glob = bench.global_attention(config, r["img_size"])
        assert r["global_gmacs"] * 1e9 == pytest.approx(total_macs(glob, r["img_size"]))
        assert r["swin_ms"] > 0
    assert rows[0]["global_ms"] > 0 and rows[1]["global_ms"] is None  # beyond measured_global_max


@pytest.mark.slow
def test_onnxruntime_implementation_runs_our_export(tmp_path):
    torch.manual_seed(0)
    model = swinx.SwinTransformer(
        swinx.SwinConfig(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7, img_size=56, num_classes=4)
    ).eval()
    net = bench.build("onnxruntime", model, "small")
    x = torch.randn(3, 3, 40, 70)
    with torch.no_grad():
        assert (net(x) - model(x)).abs().max() < 1e-4


@pytest.mark.parametrize("change", [{"mode": "train"}, {"dtype": "bfloat16"}, {"compile": True}])
def test_onnxruntime_only_for_float32_cpu_inference(change):
    spec = bench.BenchSpec(model="swin_t", batch=1, img_size=64, **change)
    with pytest.raises(ValueError, match="onnxruntime is benchmarked for float32 inference"):
        bench.compare(spec, ("swinx", "onnxruntime"), memory=False)


def test_append_csv_keeps_one_line_ending(tmp_path):
    """Rows appended run after run: one header, every line ending in a plain newline (the csv module's
    default \\r\\n used to mix with the \\n of rows read back and rewritten)."""
    path = tmp_path / "rows.csv"
    bench.append_csv(path, [{"impl": "swinx", "median_ms": 1.5}])
    bench.append_csv(path, [{"impl": "timm", "median_ms": 2.5}, {"impl": "torchvision", "median_ms": 3.0}])
    data = path.read_bytes()
    assert b"\r" not in data and data.count(b"\n") == 4
    assert [row["impl"] for row in csv.DictReader(path.open())] == ["swinx", "timm", "torchvision"]
