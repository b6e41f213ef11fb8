"""Segmenter speed: swinx's Swin trunk against timm's (`features_only`) under the same UperNet head.

Both segmenters are swinx's `UperNet` (`create_segmenter("upernet_<model>")`) with the same
weights everywhere: the peer is a deep copy of ours whose `.backbone` runs timm's Swin with
`features_only=True` (weights exported by `swinx.export_state_dict(..., "timm")`), applies the
same output norms `norm{i}` (copied) to timm's NHWC stage maps, permutes them to NCHW and feeds
the same decode head (UperHead: pyramid pooling, FPN, fuse, classifier) and auxiliary FCN head
(copied). The input normalisation (ImageNet mean and std, inside `UperNet.forward`) and the final
bilinear resize are the same code. Only the Swin trunk differs; the timm body is
`detect_bench.TimmSwinBody`, the trunk `detect_bench.timm_trunk` (imported, not copied).

Before timing, the backbone maps and the logits ("out") of the two are compared in eval mode on
one image in [0, 1] (max absolute difference, pass below 1e-4). timm matches swinx numerically
only where every stage map is a multiple of the window and no non-square map fits in one window
(for swin_t: sides that are multiples of 224): elsewhere timm rolls the map before padding it to
whole windows (swinx, like the official Swin and mmsegmentation, pads first). The compute is the
same; the numbers differ. So the check runs at the largest such size that fits in the timing size
(448x448 for the default 512x512; else the smallest, 224x224), with a timm trunk built for it in
place of the peer's, and the logits' difference at the timing size is printed for information only.

Timing is interleaved: swinx and timm alternate round by round in one process
(`swinx.tools.bench.interleaved`, the order rotating every round), each round at least
`--seconds` long (and at least one call); the median seconds per batch give images/s, and the
ratio is swinx images/s / timm images/s (> 1: swinx is faster). On a shared machine, whose load
drifts over tens of seconds, two steadier companions are reported too: the median of the
per-round ratios (the two rounds of one index ran back to back) and the ratio of the best rounds.

Training is one step: a train-mode forward on a fixed batch of random images in [0, 1], pixel-wise
cross-entropy of "out" against random integer masks (uniform over the classes, fixed seed) plus 0.4
x the cross-entropy of the auxiliary head's "aux" (as `swinx segment` trains), backward, AdamW over
every parameter. The RNG is reseeded every step, so the heads' Dropout2d drops the same channels in
both (with `--drop-path 0`, neither trunk draws random numbers). Inference is an eval forward under
torch.inference_mode (the auxiliary head does not run). The heads cost the same in both and at 512
px with 512 channels the UperHead outweighs a Swin-T trunk several times over (its 3x3 fuse conv,
2048 -> 512 channels at stride 4, alone is about 155 GMACs an image against about 25 for the
trunk), so the segmenter ratio is the trunk ratio diluted towards 1. BatchNorm (the default `--norm
bn`) needs a batch of at least 2 in training (the 1x1 pooling branch holds one value per channel);
`--norm gn` takes any batch. timm's trunk is built for the input size (its static attention masks,
its fastest path); `--timm-dynamic` builds it with `strict_img_size=False`.

The check compares both the backbone maps and the logits because freshly initialised heads give
small logits (a trunk difference shrinks on its way through them); the maps carry the check.

Default run, appending to benchmarks/results/segment-<cpu>_torch<v>_<date>.csv. At 512 px each
round is a single call, so a run is 2 x (repeats + 1) training steps and as many inference
forwards. Not yet timed at the defaults; extrapolated (x4 in pixels) from a one-thread 256x256
smoke run on a shared 2-core machine (10 s a training step, 2.6 s an inference, batch 2), expect
5-10 minutes; `--repeats 3` for less:

    .venv/bin/python benchmarks/segment_bench.py
    # = --model swin_t --batch 2 --size 512 --mode both --seconds 2 --repeats 5 --threads 2
    #   --num-classes 150 --channels 512 --aux-channels 256 --norm bn

Rectangular sizes are given as HxW (--size 512x1024); both sides must be multiples of 32 (the
trunk's total stride; at other sizes each trunk pads its maps in its own way, which this does not cover).
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import swinx
from swinx.segmentation.model import NORMS, create_segmenter
from swinx.tools.bench import interleaved

_spec = importlib.util.spec_from_file_location("detect_bench", Path(__file__).resolve().with_name("detect_bench.py"))
detect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(detect)  # the timm body and trunk, size rules, host and CLI helpers

TOL = detect.TOL
AUX_WEIGHT = 0.4
RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "date",
    "segmenter",
    "model",
    "mode",
    "impl",
    "batch",
    "height",
    "width",
    "num_classes",
    "channels",
    "aux_channels",
    "norm",
    "backbone_args",
    "images_per_second",
    "median_ms_per_batch",
    "rounds_ms",
    "ratio_swinx_over_timm",
    "ratio_paired_median",
    "ratio_best",
    "check",
    "check_size",
    "check_backbone_max_diff",
    "check_logits_max_diff",
    "timing_size_logits_max_diff",
    "timm_trunk",
    "cpu",
    "device",
    "threads",
    "torch",
    "torchvision",
    "timm",
    "swinx",
    "python",
]


# ---------------------------------------------------------------------------------------------
# The peer: timm's features_only Swin under our output norms and UperNet heads


def timm_body(ours: nn.Module, model: str, img_hw: tuple[int, int], dynamic: bool = False, norms=None) -> nn.Module:
    """timm's trunk with `ours.backbone`'s weights and our output norms (copies unless `norms` is given):
    a drop-in `SwinBackbone` returning the OrderedDict {"0": NCHW map, ..., "3": ...}."""
    backbone = ours.backbone
    trunk = detect.timm_trunk(model, backbone, img_hw, dynamic)
    fmt = getattr(trunk, "output_fmt", "NHWC")  # timm's Swin features: NHWC (TimmSwinBody norms, then permutes)
    if fmt != "NHWC":
        raise RuntimeError(f"timm's features_only Swin returns {fmt} maps; the timm body expects NHWC")
    if norms is None:
        norms = {i: copy.deepcopy(getattr(backbone, f"norm{i}")) for i in backbone.out_indices}
    return detect.TimmSwinBody(trunk, norms)


def timm_segmenter(ours: nn.Module, model: str, img_hw: tuple[int, int], dynamic: bool = False) -> nn.Module:
    """A deep copy of `ours` (same decode and auxiliary heads, same input normalisation, output norms copied)
    whose Swin trunk is timm's."""
    peer = copy.deepcopy(ours)
    peer.backbone = timm_body(ours, model, img_hw, dynamic)
    return peer


def check_size(config, img_hw: tuple[int, int]) -> tuple[int, int]:
    """Where timm and swinx agree, closest to the timing size: the size itself if timm matches there, else
    the largest multiples of the matching side within it (448x448 for 512x512, swin_t), else the smallest
    matching square (224x224)."""
    if detect.timm_matches(config, img_hw):
        return img_hw
    side = detect.matching_size(config)[0]
    fit = tuple(max(side, n // side * side) for n in img_hw)
    return fit if detect.timm_matches(config, fit) else detect.matching_size(config)


# ---------------------------------------------------------------------------------------------
# Agreement


@torch.no_grad()
def compare_logits(
    ours: nn.Module, peer: nn.Module, x: torch.Tensor, peer_backbone: nn.Module | None = None
) -> tuple[float, float]:
    """Max |difference| of the backbone maps (after norm{i}, NCHW; on the normalised input) and of the
    logits "out", eval mode; `peer_backbone` stands in for the peer's backbone during the comparison."""
    was = ours.training, peer.training
    saved = peer.backbone
    ours.eval(), peer.eval()
    try:
        if peer_backbone is not None:
            peer.backbone = peer_backbone
        normalised = (x - ours.image_mean) / ours.image_std
        a_maps, b_maps = ours.backbone(normalised), peer.backbone(normalised)
        a_out, b_out = ours(x)["out"], peer(x)["out"]
    finally:
        peer.backbone = saved
        ours.train(was[0]), peer.train(was[1])
    assert list(a_maps) == list(b_maps) and a_out.shape == b_out.shape
    maps = max((a_maps[k] - b_maps[k]).abs().max().item() for k in a_maps)
    return maps, (a_out - b_out).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Workloads


def synthetic_batch(batch: int, img_hw: tuple[int, int], num_classes: int, seed: int = 0):
    """Images in [0, 1], (B, 3, H, W), and masks of random class indices, (B, H, W) int64."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, *img_hw, generator=g)
    masks = torch.randint(0, num_classes, (batch, *img_hw), generator=g)
    return images, masks


def segmentation_loss(out: dict, masks: torch.Tensor, aux_weight: float = AUX_WEIGHT) -> torch.Tensor:
    """Cross-entropy of "out" plus aux_weight x that of "aux" (when present), as `swinx segment` trains."""
    loss = F.cross_entropy(out["out"], masks)
    if "aux" in out:
        loss = loss + aux_weight * F.cross_entropy(out["aux"], masks)
    return loss


def train_step(segmenter: nn.Module, images, masks, lr: float = 1e-6, seed: int = 0, aux_weight: float = AUX_WEIGHT):
    """One training step (train-mode forward, loss, backward, AdamW); the RNG is reseeded every step."""
    segmenter.train()
    optimizer = torch.optim.AdamW([p for p in segmenter.parameters() if p.requires_grad], lr=lr)

    def step():
        torch.manual_seed(seed)
        optimizer.zero_grad(set_to_none=True)
        loss = segmentation_loss(segmenter(images), masks, aux_weight)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def infer_step(segmenter: nn.Module, images):
    segmenter.eval()

    def infer():
        with torch.inference_mode():
            return segmenter(images)

    return infer


# ---------------------------------------------------------------------------------------------
# Output


def default_out() -> Path:
    detect_csv = detect.default_out()  # detect-<cpu>_torch<v>_<date>.csv
    return RESULTS / detect_csv.name.replace("detect-", "segment-", 1)


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="swin_t", help="a Swin V1 variant with a timm twin (swin_t, swin_s, ...)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=detect.parse_size, default=(512, 512), help="N or HxW, multiples of 32 (512)")
    p.add_argument("--mode", default="both", choices=["train", "infer", "both"])
    p.add_argument("--seconds", type=float, default=2.0, help="minimum length of each timed round")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per implementation")
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed calls per implementation first (besides the untimed call that sizes the rounds)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=150)
    p.add_argument("--channels", type=int, default=512, help="UperHead width")
    p.add_argument("--aux-channels", type=int, default=256, help="auxiliary FCN head width (0: no auxiliary head)")
    p.add_argument("--aux-weight", type=float, default=AUX_WEIGHT, help="weight of the auxiliary loss")
    p.add_argument("--norm", default="bn", choices=NORMS, help="the heads' normalisation")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of both trunks")
    p.add_argument("--timm-dynamic", action="store_true", help="timm with strict_img_size=False (masks per forward)")
    p.add_argument("--backbone-args", default="", help="SwinConfig overrides, e.g. embed_dim=16,depths=2-2-2-2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="CSV to append to (default benchmarks/results/segment-*.csv)")
    args = p.parse_args(argv)
    if args.size[0] % 32 or args.size[1] % 32:
        p.error(f"--size sides must be multiples of 32 (the trunk's stride), got {args.size[0]}x{args.size[1]}")
    if args.norm == "bn" and args.batch < 2 and args.mode != "infer":
        p.error("training with BatchNorm needs --batch >= 2 (the 1x1 pooling branch); or use --norm gn")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    H, W = args.size
    backbone_args = {**detect.parse_overrides(args.backbone_args), "drop_path_rate": args.drop_path}
    import timm
    import torchvision

    torch.manual_seed(args.seed)
    ours = create_segmenter(
        f"upernet_{args.model}",
        args.num_classes,
        channels=args.channels,
        aux_channels=args.aux_channels or None,
        norm=args.norm,
        backbone_args=backbone_args,
    )
    peer = timm_segmenter(ours, args.model, (H, W), args.timm_dynamic)
    config = ours.backbone.config

    # --- agreement
    g = torch.Generator().manual_seed(args.seed + 1)
    check_hw = check_size(config, (H, W))
    timing_exact = check_hw == (H, W)
    if timing_exact:
        maps_diff, logits_diff = compare_logits(ours, peer, torch.rand(1, 3, *check_hw, generator=g))
        timing_diff = logits_diff
    else:
        check_body = timm_body(
            ours,
            args.model,
            check_hw,
            args.timm_dynamic,
            {i: getattr(peer.backbone, f"norm{i}") for i in peer.backbone.out_indices},
        )
        x = torch.rand(1, 3, *check_hw, generator=g)
        maps_diff, logits_diff = compare_logits(ours, peer, x, check_body)
        del check_body
        _, timing_diff = compare_logits(ours, peer, torch.rand(1, 3, H, W, generator=g))
    check = "pass" if max(maps_diff, logits_diff) < TOL else "FAIL"
    print(
        f"agreement (eval, one image): backbone maps (after norm0-3) and logits at "
        f"{check_hw[0]}x{check_hw[1]}: max |diff| {maps_diff:.2e} / {logits_diff:.2e} -> {check} (tol {TOL:g})"
    )
    if not timing_exact:
        print(
            f"  at the timing size {H}x{W} timm computes differently (windows not whole: "
            f"it rolls before padding); logits max |diff| there {timing_diff:.2e}, for information"
        )
    if check != "pass":
        print("WARNING: the two segmenters disagree; timings compare different computations", file=sys.stderr)

    # --- timing
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    images, masks = synthetic_batch(args.batch, (H, W), args.num_classes, args.seed)
    host = {
        "cpu": detect.host_line(),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "swinx": swinx.__version__,
        "python": platform.python_version(),
    }
    common = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        segmenter="upernet",
        model=args.model,
        batch=args.batch,
        height=H,
        width=W,
        num_classes=args.num_classes,
        channels=args.channels,
        aux_channels=args.aux_channels,
        norm=args.norm,
        backbone_args=args.backbone_args,
        check=check,
        check_size=f"{check_hw[0]}x{check_hw[1]}",
        check_backbone_max_diff=f"{maps_diff:.3e}",
        check_logits_max_diff=f"{logits_diff:.3e}",
        timing_size_logits_max_diff=f"{timing_diff:.3e}",
        timm_trunk="dynamic" if args.timm_dynamic else f"static {H}x{W}",
        **host,
    )
    nets = {"swinx": ours, "timm": peer}
    rows = []
    for mode in modes:
        start = time.perf_counter()
        if mode == "train":
            step = lambda net: train_step(net, images, masks, seed=args.seed, aux_weight=args.aux_weight)
            fns = {k: step(net) for k, net in nets.items()}
        else:
            fns = {k: infer_step(net, images) for k, net in nets.items()}
        rounds = interleaved(fns, torch.device("cpu"), args.repeats, args.seconds, args.warmup)
        medians = {k: statistics.median(v) for k, v in rounds.items()}
        ratio = medians["timm"] / medians["swinx"]
        # Load from other work drifts over tens of seconds: the rounds of one index ran back to back, so
        # the median of their per-round ratios and the ratio of the best rounds are steadier companions.
        paired = statistics.median(t / o for o, t in zip(rounds["swinx"], rounds["timm"]))
        best = min(rounds["timm"]) / min(rounds["swinx"])
        for impl in nets:
            rows.append(
                dict(
                    common,
                    mode=mode,
                    impl=impl,
                    images_per_second=f"{args.batch / medians[impl]:.4f}",
                    median_ms_per_batch=f"{medians[impl] * 1e3:.1f}",
                    rounds_ms=" ".join(f"{t * 1e3:.1f}" for t in rounds[impl]),
                    ratio_swinx_over_timm=f"{ratio:.4f}",
                    ratio_paired_median=f"{paired:.4f}",
                    ratio_best=f"{best:.4f}",
                )
            )
        print(f"  {mode}: {args.repeats} interleaved rounds in {time.perf_counter() - start:.0f} s")
        for net in nets.values():
            net.zero_grad(set_to_none=True)

    print(
        f"\nupernet {args.model} ({args.channels} channels, {args.num_classes} classes), batch {args.batch}, "
        f"{H}x{W}, {host['threads']} threads, {host['cpu']}, torch {host['torch']}, timm {host['timm']}"
    )
    print(
        "images/s from the median round; swinx/timm = ratio of images/s (> 1: swinx faster): of the medians,"
        " median of per-round pairs, of the best rounds"
    )
    print(
        f"{'mode':<6} {'impl':<6} {'images/s':>9} {'ms/batch':>9}  {'swinx/timm':>10} {'paired':>7} {'best':>7}"
        f"  rounds (ms)"
    )
    for r in rows:
        print(
            f"{r['mode']:<6} {r['impl']:<6} {float(r['images_per_second']):>9.3f} "
            f"{float(r['median_ms_per_batch']):>9.1f}  {float(r['ratio_swinx_over_timm']):>10.3f} "
            f"{float(r['ratio_paired_median']):>7.3f} {float(r['ratio_best']):>7.3f}  {r['rounds_ms']}"
        )
    out = args.out or default_out()
    write_rows(rows, out)
    print(f"\nwrote {len(rows)} rows to {out}")
    return rows


if __name__ == "__main__":
    main()
