"""Benchmarks: throughput, latency and memory of swinx beside timm and torchvision, as ratios.

On a shared machine an absolute time means little; a ratio measured in one process, with the
implementations interleaved repeat by repeat, means a lot. `compare()` builds every
implementation with the same weights (our export to each peer's layout), checks that they
agree, and times them round-robin. timm and torchvision are imported here only, and only
when a comparison asks for them.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from swinx.model.swin import SwinTransformer
from swinx.model.variants import TIMM_NAMES, create_model
from swinx.tools.flops import macs
from swinx.tools.host import host_info, host_slug
from swinx.weights.checkpoint import export_state_dict

TORCHVISION_NAMES = {
    "swin_t": "swin_t",
    "swin_s": "swin_s",
    "swin_b": "swin_b",
    "swinv2_t": "swin_v2_t",
    "swinv2_s": "swin_v2_s",
    "swinv2_b": "swin_v2_b",
}
PEERS = ("timm", "torchvision")


@dataclass
class BenchSpec:
    """One benchmark setting."""

    model: str = "swin_t"
    batch: int = 8
    img_size: int | None = None  # default: the variant's
    mode: str = "infer"  # infer | train (forward, backward, AdamW step)
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    compile: bool = False
    device: str = "cpu"
    repeats: int = 7  # interleaved rounds; the median is reported
    min_seconds: float = 0.5  # each timed round runs at least this long
    warmup: int = 2


@dataclass
class Result:
    impl: str
    model: str
    mode: str
    batch: int
    img_size: int
    dtype: str
    compiled: bool
    device: str
    threads: int
    torch: str
    median_ms: float  # per batch
    images_per_second: float
    rounds_ms: list[float] = field(default_factory=list)
    speedup_of_swinx: float | None = None  # their median / ours (>1: swinx is faster)
    peak_memory_mb: float | None = None
    max_abs_diff: float | None = None  # output vs swinx's
    gmacs_per_image: float | None = None
    fraction_of_matmul_peak: float | None = None

    def row(self) -> dict:
        """The CSV row: the fields, then the host's (CPU model, family/model, ISA level, cores)."""
        d = asdict(self)
        d["rounds_ms"] = " ".join(f"{t:.2f}" for t in self.rounds_ms)
        d.update({f"host_{k}": v for k, v in host_info().items() if k != "threads"})
        if self.impl == "swinx" and self.device == host_info()["cpu"]:
            from swinx.model import native

            d["c_kernels"] = native.library() is not None  # the window-attention kernel (swinx.model.native)
        return d


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return host_info()["cpu"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Models with the same weights


def build(impl: str, model: SwinTransformer, name: str) -> torch.nn.Module:
    """`impl` ("swinx", "timm", "torchvision") of variant `name`, carrying `model`'s weights."""
    if impl == "swinx":
        return model
    if impl == "timm":
        import timm

        if name not in TIMM_NAMES:
            raise ValueError(f"no timm counterpart of {name}; known: {sorted(TIMM_NAMES)}")
        peer = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=model.num_classes)
    elif impl == "torchvision":
        import torchvision

        if name not in TORCHVISION_NAMES:
            raise ValueError(f"no torchvision counterpart of {name}; known: {sorted(TORCHVISION_NAMES)}")
        peer = getattr(torchvision.models, TORCHVISION_NAMES[name])(num_classes=model.num_classes)
    elif impl == "onnxruntime":
        return OnnxRuntimeModel(model)
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose swinx, timm, torchvision or onnxruntime")
    peer.load_state_dict(export_state_dict(model, impl), strict=True)
    return peer


class OnnxRuntimeModel(torch.nn.Module):
    """`model` exported by `swinx.tools.export.export_onnx` and run by onnxruntime on the CPU (inference only)."""

    def __init__(self, model: SwinTransformer):
        import tempfile

        from swinx.tools.export import export_onnx, onnx_session

        super().__init__()
        with tempfile.TemporaryDirectory() as folder:
            path = f"{folder}/model.onnx"
            side = model.config.img_hw[0]
            export_onnx(model, path, sizes=[(side, side)], batches=(1,))
            self.session = onnx_session(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"x": x.detach().cpu().float().numpy()})[0])


# ---------------------------------------------------------------------------------------------
# Timing


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, min_seconds: float, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, `repeats` rounds each, the functions taking turns.

    The order rotates every round so that no implementation always runs first (or right
    after the most cache-hungry one). CUDA is timed with events, the CPU with perf_counter.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    calls = {}
    for name in names:  # calls per round so that a round lasts at least min_seconds
        start = time.perf_counter()
        fns[name]()
        synchronize(device)
        calls[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            rounds[name].append(_time(fns[name], calls[name], device))
    return rounds


def _time(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end) / 1e3 / calls
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def cuda_peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """CUDA: peak bytes allocated by one call above what was allocated before it (MB)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def process_peak_rss(spec: BenchSpec, impl: str) -> float:
    """CPU: peak resident memory (MB) of a fresh process that builds `impl` and runs the workload
    three times. PyTorch keeps no peak statistic for CPU tensors; Linux does (VmHWM)."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "swinx.tools.bench", json.dumps(asdict(spec)), impl],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {impl} failed: {done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def _rss_main(spec_json: str, impl: str) -> None:
    import json

    from swinx.engine.memory import keep_freed_memory

    keep_freed_memory()  # as in the `swinx bench` process that asked (SWINX_MALLOC is inherited)
    spec = BenchSpec(**json.loads(spec_json))
    torch.manual_seed(0)
    model = create_model(spec.model, drop_path_rate=0.0)
    size = spec.img_size or model.config.img_hw[0]
    x = torch.randn(spec.batch, model.config.in_chans, size, size)
    labels = torch.randint(0, model.num_classes, (spec.batch,))
    net = build(impl, model, spec.model)
    if impl != "swinx":
        del model
    fn = workload(torch.compile(net) if spec.compile else net, spec, x, labels)
    for _ in range(3):
        fn()
    # VmHWM, not getrusage's ru_maxrss: on Linux a child inherits its parent's ru_maxrss across exec.
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    print(int(status["VmHWM"].split()[0]) / 1024)  # kB -> MB


def matmul_rate(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n: int = 2048, repeats: int = 5
) -> dict[str, float]:
    """The machine's dense matmul rate in FLOP/s (median of `repeats` n x n x n products), per kernel.

    On the CPU both PyTorch's default (`torch.mm`, BLAS) and oneDNN's linear are measured:
    oneDNN is often twice as fast, and a roofline must use the best the machine can do.
    """
    from swinx.model import ops

    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    kernels = {"torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and ops.HAS_ONEDNN_LINEAR:
        kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    with torch.inference_mode():
        rounds = interleaved(kernels, device, repeats, 0.3, 1)
    return {name: 2 * n**3 / statistics.median(times) for name, times in rounds.items()}


# ---------------------------------------------------------------------------------------------
# Workloads


def workload(net: torch.nn.Module, spec: BenchSpec, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], object]:
    """The function to time: an inference forward, or a training step with AdamW."""
    autocast = spec.dtype == "bfloat16"
    device_type = x.device.type
    if spec.mode == "infer":
        net.eval()

        def infer():
            with torch.inference_mode(), torch.autocast(device_type, torch.bfloat16, enabled=autocast):
                return net(x)

        return infer
    if spec.mode != "train":
        raise ValueError(f"mode must be infer or train, got {spec.mode!r}")
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(net(x), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def compare(
    spec: BenchSpec, impls: tuple[str, ...] = ("swinx",), memory: bool = True, roofline: float | None = None
) -> list[Result]:
    """Time `impls` on the same weights and inputs; the first row is swinx, then each peer with its ratio.

    `roofline` (FLOP/s, e.g. from `matmul_rate`) adds the fraction of it each one reaches.
    """
    device = torch.device(spec.device)
    torch.manual_seed(0)
    model = create_model(spec.model, drop_path_rate=0.0).to(device)
    size = spec.img_size or model.config.img_hw[0]
    x = torch.randn(spec.batch, model.config.in_chans, size, size, device=device)
    labels = torch.randint(0, model.num_classes, (spec.batch,), device=device)
    if "onnxruntime" in impls and (
        spec.mode != "infer" or spec.dtype != "float32" or spec.compile or device.type != "cpu"
    ):
        raise ValueError("onnxruntime is benchmarked for float32 inference on the CPU only, without --compile")
    nets = {impl: build(impl, model, spec.model).to(device) for impl in impls}

    reference = None
    diffs = {}
    with torch.inference_mode():
        for impl, net in nets.items():
            net.eval()
            out = net(x).float()
            reference = out if reference is None else reference
            diffs[impl] = (out - reference).abs().max().item()

    fns = {}
    if spec.compile and spec.mode == "infer":
        import torch._inductor.config as inductor_config

        # Inference graphs with the weights frozen as constants: inductor then keeps oneDNN's
        # prepacked GEMMs in the graph (without it, compiled swin_t ran 0.94x our eager path on
        # host C; with it 1.06x). Every implementation gets the same setting.
        inductor_config.freezing = True
    for impl, net in nets.items():
        runnable = torch.compile(net) if spec.compile else net
        fns[impl] = workload(runnable, spec, x, labels)
    rounds = interleaved(fns, device, spec.repeats, spec.min_seconds, spec.warmup)
    gmacs = sum(p.macs for p in macs(model.config, size)) / 1e9
    results = []
    ours = statistics.median(rounds[impls[0]])
    for impl in impls:
        median = statistics.median(rounds[impl])
        images = spec.batch / median
        flops_rate = images * 2 * gmacs * 1e9 * (3 if spec.mode == "train" else 1)
        results.append(
            Result(
                impl=impl,
                model=spec.model,
                mode=spec.mode,
                batch=spec.batch,
                img_size=size,
                dtype=spec.dtype,
                compiled=spec.compile,
                device=device_name(device),
                threads=torch.get_num_threads(),
                torch=torch.__version__,
                median_ms=median * 1e3,
                images_per_second=images,
                rounds_ms=[t * 1e3 for t in rounds[impl]],
                speedup_of_swinx=median / ours,
                peak_memory_mb=(
                    None
                    if not memory or impl == "onnxruntime"  # its child would measure the export
                    else cuda_peak_memory(fns[impl], device)
                    if device.type == "cuda"
                    else process_peak_rss(spec, impl)
                ),
                max_abs_diff=diffs[impl],
                gmacs_per_image=gmacs,
                fraction_of_matmul_peak=flops_rate / roofline if roofline else None,
            )
        )
    return results


# ---------------------------------------------------------------------------------------------
# Cost against resolution: shifted windows against global attention


def global_attention(config, img_size: int):
    """The same network with one window covering each stage's whole map: ViT-style global attention."""
    return config.replace(window_size=math.ceil(img_size / config.patch_size), img_size=img_size)


def scaling(
    model: str = "swin_t",
    sizes=(224, 320, 448, 640, 800, 1024),
    measured_global_max: int = 448,
    device: str = "cpu",
    repeats: int = 3,
) -> list[dict]:
    """Inference time (batch 1) and MACs per image against input size, for windowed and global attention.

    Global attention is timed only up to `measured_global_max`: beyond it the N x N attention
    of the first stage needs gigabytes; its analytic MACs are given at every size.
    """
    device = torch.device(device)
    base = create_model(model, drop_path_rate=0.0).to(device).eval()
    rows = []
    for size in sizes:
        glob_config = global_attention(base.config, size)
        row = {
            "img_size": size,
            "tokens": math.ceil(size / base.config.patch_size) ** 2,
            "swin_gmacs": sum(p.macs for p in macs(base.config, size)) / 1e9,
            "global_gmacs": sum(p.macs for p in macs(glob_config, size)) / 1e9,
            "swin_ms": None,
            "global_ms": None,
        }
        x = torch.randn(1, base.config.in_chans, size, size, device=device)
        fns = {"swin": lambda: base(x)}
        if size <= measured_global_max:
            glob = SwinTransformer(glob_config).to(device).eval()
            fns["global"] = lambda: glob(x)
        with torch.inference_mode():
            rounds = interleaved(fns, device, repeats, 0.2, 1)
        row["swin_ms"] = statistics.median(rounds["swin"]) * 1e3
        if "global" in rounds:
            row["global_ms"] = statistics.median(rounds["global"]) * 1e3
        rows.append(row)
    return rows


def plot_scaling(rows: list[dict], path, title: str) -> None:
    """Measured time and analytic MACs against input size, log-log, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from swinx.weights.checkpoint import atomic_write

    sizes = [r["img_size"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.plot(sizes, [r["swin_ms"] for r in rows], "o-", label="shifted windows (swinx)")
    measured = [(r["img_size"], r["global_ms"]) for r in rows if r["global_ms"] is not None]
    ax_t.plot(*zip(*measured), "s-", label="global attention, same width")
    ax_m.plot(sizes, [r["swin_gmacs"] for r in rows], "o-", label="shifted windows")
    ax_m.plot(sizes, [r["global_gmacs"] for r in rows], "s--", label="global attention")
    for ax, ylabel in ((ax_t, "ms per image (measured)"), (ax_m, "GMACs per image (analytic)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set(xlabel="input size (pixels per side)", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def record(rows: list[dict], out_dir, device: torch.device) -> str:
    """Append rows to benchmarks/results/<host>_torch<version>_<date>.csv (header when new; <host> names the
    CPU model and family/model, or the GPU)."""
    import re

    slug = (
        re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower() if device.type == "cuda" else host_slug()
    )
    path = Path(out_dir) / f"{slug}_torch{torch.__version__.split('+')[0]}_{time.strftime('%Y-%m-%d')}.csv"
    append_csv(path, rows)
    return str(path)


def append_csv(path, rows: list[dict]) -> None:
    """Append rows to a CSV file, atomically; the header (the rows' keys) when the file is new."""
    import csv
    import io

    from swinx.weights.checkpoint import atomic_write

    path = Path(path)
    old = path.read_text() if path.exists() else ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(old + buffer.getvalue()))


if __name__ == "__main__":  # python -m swinx.tools.bench SPEC_JSON IMPL: the peak-RSS probe
    import sys

    _rss_main(sys.argv[1], sys.argv[2])
