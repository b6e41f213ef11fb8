"""Detector speed: swinx's Swin trunk against timm's (`features_only`) under the same torchvision detector.

Both detectors are the same torchvision class (Mask R-CNN by default) with the same weights
everywhere: the peer is a deep copy of ours whose `backbone.body` runs timm's Swin with
`features_only=True` (weights exported by `swinx.export_state_dict(..., "timm")`), permutes its
NHWC maps to NCHW after the same output norms `norm{i}` (copied), and feeds the same FPN
(copied). Only the Swin trunk differs. Before timing, the backbone maps and FPN outputs of the
two are compared in eval mode on one input (max absolute difference, pass below 1e-4).

timm matches swinx numerically only where every stage map is a multiple of the window and no
non-square map fits in one window (for swin_t: sides that are multiples of 224, e.g. 224x224,
448x448): elsewhere timm rolls the map before padding it to whole windows (swinx, like the
official Swin and mmdetection, pads first), and it clamps small windows per axis. The compute
is the same; the numbers differ. At such a timing size the check runs at 224x224 (with a timm
trunk built for it) and the difference at the timing size is printed for information only.

Timing is interleaved: swinx and timm alternate round by round in one process
(`swinx.tools.bench.interleaved`, the order rotating every round), each round at least
`--seconds` long; the median seconds per batch give images/s, and the ratio is
swinx images/s / timm images/s (> 1: swinx is faster). On a shared machine, whose load drifts
over tens of seconds, two steadier companions are reported too: the median of the per-round
ratios (the two rounds of one index ran back to back) and the ratio of the best rounds.

Training is one step: forward with targets (a few random boxes, and box-shaped masks for Mask
R-CNN, fixed seed; the RPN/RoI samplers reseeded each step so both do the same work),
backward, AdamW. Inference is an eval forward under torch.inference_mode; with untrained
heads (91 classes) no detection passes the 0.05 score threshold, so Mask R-CNN's mask head
does not run there. The heads are torchvision's defaults and cost the same in both detectors
(in training the mask head on up to 128 positive RoIs an image outweighs a Swin-T trunk at
224 px), so the detector ratio is the trunk ratio diluted towards 1. timm's trunk is built for
the input size (its static attention masks, its fastest path); `--timm-dynamic` builds it with
`strict_img_size=False`.

Default run, appending to benchmarks/results/detect-<cpu>_torch<v>_<date>.csv (about 1.5 minutes
on an idle 2-core machine, 4-5 minutes while other work shares it; `--repeats 3` for less):

    .venv/bin/python benchmarks/detect_bench.py
    # = --detector maskrcnn --model swin_t --batch 2 --size 224 --mode both --seconds 2 --repeats 5 --threads 2

Rectangular sizes are given as HxW (--size 256x320).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import platform
import re
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

import swinx
from swinx.detection.model import create_detector
from swinx.tools.bench import TIMM_NAMES, interleaved
from swinx.tools.host import host_line, host_slug

TOL = 1e-4
RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "date",
    "detector",
    "model",
    "mode",
    "impl",
    "batch",
    "height",
    "width",
    "num_classes",
    "fpn_channels",
    "backbone_args",
    "detector_args",
    "images_per_second",
    "median_ms_per_batch",
    "rounds_ms",
    "ratio_swinx_over_timm",
    "ratio_paired_median",
    "ratio_best",
    "check",
    "check_size",
    "check_backbone_max_diff",
    "check_fpn_max_diff",
    "timing_size_fpn_max_diff",
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
# The peer: timm's features_only Swin under our output norms and FPN


class TimmSwinBody(nn.Module):
    """timm's Swin (`features_only=True`, NHWC maps before each stage's patch merging, as ours) followed by
    the output norms `norm{i}` and a permute to NCHW: the drop-in twin of `SwinBackbone`."""

    def __init__(self, trunk: nn.Module, norms: dict[int, nn.LayerNorm]):
        super().__init__()
        self.trunk = trunk
        self.out_indices = tuple(sorted(norms))
        for i, norm in norms.items():
            self.add_module(f"norm{i}", norm)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.trunk(x)
        return OrderedDict(
            (str(i), getattr(self, f"norm{i}")(m).permute(0, 3, 1, 2).contiguous())
            for i, m in zip(self.out_indices, maps)
        )


class TimmSwinFPN(nn.Module):
    """`SwinFPN` with the timm body: body -> the same torchvision FeaturePyramidNetwork."""

    def __init__(self, body: TimmSwinBody, fpn: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def timm_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Our backbone's trunk weights in the key names of timm's features_only Swin (layers_i.*)."""
    config = backbone.config
    classifier = swinx.SwinTransformer(config.replace(num_classes=0))
    trunk_keys = {k for k in classifier.state_dict() if k.startswith(("patch_embed.", "layers."))}
    state = {k: v for k, v in backbone.state_dict().items() if k in trunk_keys}
    missing = trunk_keys - set(state)
    if missing:
        raise RuntimeError(f"backbone lacks classifier keys {sorted(missing)[:5]}")
    classifier.load_state_dict(state, strict=False)
    exported = swinx.export_state_dict(classifier, "timm")
    return {
        re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v
        for k, v in exported.items()
        if k.startswith(("patch_embed.", "layers."))
    }


def _config_args(config) -> dict:
    return {
        "embed_dim": config.embed_dim,
        "depths": config.depths,
        "num_heads": config.num_heads,
        "window_size": config.window_size,
        "mlp_ratio": config.mlp_ratio,
        "qkv_bias": config.qkv_bias,
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "drop_path_rate": config.drop_path_rate,
        "attn_drop_rate": config.attn_drop_rate,
        "drop_rate": config.drop_rate,
    }


def timm_trunk(model: str, backbone: nn.Module, img_hw: tuple[int, int], dynamic: bool = False) -> nn.Module:
    """timm's features_only Swin with `backbone`'s trunk weights, built for `img_hw` (static masks) or for any
    size (`dynamic`: strict_img_size=False, masks built each forward)."""
    import timm

    config = backbone.config
    if config.version != 1 or config.ape or not config.patch_norm:
        raise ValueError("the timm peer covers Swin V1 without absolute position embedding, with patch norm")
    if model not in TIMM_NAMES or not TIMM_NAMES[model].startswith("swin_"):
        raise ValueError(
            f"no timm Swin V1 counterpart of {model!r}; known: "
            f"{sorted(k for k, v in TIMM_NAMES.items() if v.startswith('swin_'))}"
        )
    maps = [
        (math.ceil(img_hw[0] / (config.patch_size * 2**i)), math.ceil(img_hw[1] / (config.patch_size * 2**i)))
        for i in range(len(config.depths))
    ]
    if min(min(m) for m in maps) < config.window_size:
        raise ValueError(
            f"timm cannot take these weights at {img_hw[0]}x{img_hw[1]}: a stage map {min(maps)} is "
            f"smaller than the window {config.window_size}, so timm builds a smaller window (and "
            f"relative-position table) there; use a size whose last map is >= the window "
            f"(>= {matching_size(config)[0]} px a side)"
        )
    args = _config_args(config)
    args.pop("drop_rate")
    trunk = timm.create_model(
        TIMM_NAMES[model],
        pretrained=False,
        features_only=True,
        out_indices=backbone.out_indices,
        img_size=img_hw,
        strict_img_size=not dynamic,
        proj_drop_rate=config.drop_rate,
        **args,
    )
    trunk.load_state_dict(timm_state_dict(backbone), strict=True)
    return trunk


def timm_detector(ours: nn.Module, model: str, img_hw: tuple[int, int], dynamic: bool = False) -> nn.Module:
    """A deep copy of `ours` (same heads, transform, FPN, output norms) whose Swin trunk is timm's."""
    peer = copy.deepcopy(ours)
    body = ours.backbone.body
    norms = {i: copy.deepcopy(getattr(body, f"norm{i}")) for i in body.out_indices}
    trunk = timm_trunk(model, body, img_hw, dynamic)
    peer.backbone = TimmSwinFPN(
        TimmSwinBody(trunk, norms), copy.deepcopy(ours.backbone.fpn), ours.backbone.out_channels
    )
    return peer


def matching_size(config) -> tuple[int, int]:
    """The smallest square input at which timm and swinx agree: last stage map = one window (224 for swin_t)."""
    side = config.window_size * config.patch_size * 2 ** (len(config.depths) - 1)
    return side, side


def timm_matches(config, img_hw: tuple[int, int]) -> bool:
    """Whether timm's Swin computes exactly what ours does at this input size: every stage map a multiple of
    the window (timm pads after the cyclic shift, we before) and none that fits in one window along one
    side only (timm clamps such a window per axis, we to a square)."""
    h, w = img_hw
    for i in range(len(config.depths)):
        step = config.patch_size * 2**i
        mh, mw = math.ceil(h / step), math.ceil(w / step)
        if mh % config.window_size or mw % config.window_size:
            return False
        if min(mh, mw) <= config.window_size and (mh != mw or config.small_map == "pad_shift"):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Agreement


@torch.no_grad()
def compare_features(
    ours: nn.Module, peer: nn.Module, x: torch.Tensor, peer_body: nn.Module | None = None
) -> tuple[float, float]:
    """Max |difference| of the backbone maps (after norm{i}, NCHW) and of every FPN level, eval mode."""
    was = ours.training, peer.training
    ours.eval(), peer.eval()
    try:
        a_body = ours.backbone.body(x)
        b_body = (peer_body or peer.backbone.body)(x)
        a_fpn, b_fpn = ours.backbone.fpn(a_body), peer.backbone.fpn(b_body)
    finally:
        ours.train(was[0]), peer.train(was[1])
    assert list(a_body) == list(b_body) and list(a_fpn) == list(b_fpn)
    body = max((a_body[k] - b_body[k]).abs().max().item() for k in a_body)
    fpn = max((a_fpn[k] - b_fpn[k]).abs().max().item() for k in a_fpn)
    return body, fpn


# ---------------------------------------------------------------------------------------------
# Workloads


def synthetic_batch(
    batch: int, img_hw: tuple[int, int], num_classes: int, masks: bool, seed: int = 0, boxes_per_image: int = 3
):
    """Images in [0, 1] and targets: a few random boxes per image with labels >= 1, and filled-box masks."""
    g = torch.Generator().manual_seed(seed)
    H, W = img_hw
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, H, W, generator=g))
        wh = torch.rand(boxes_per_image, 2, generator=g) * 0.35 + 0.1  # 10-45 % of each side
        xy = torch.rand(boxes_per_image, 2, generator=g) * (1 - wh)
        boxes = torch.cat([xy, xy + wh], dim=1) * torch.tensor([W, H, W, H], dtype=torch.float32)
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes, (boxes_per_image,), generator=g)}
        if masks:
            m = torch.zeros(boxes_per_image, H, W, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                m[j, y0:y1, x0:x1] = 1
            target["masks"] = m
        targets.append(target)
    return images, targets


def train_step(detector: nn.Module, images, targets, lr: float = 1e-6, seed: int = 0):
    """One training step (forward with targets, backward, AdamW); the samplers are reseeded every step."""
    detector.train()
    optimizer = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad], lr=lr)

    def step():
        torch.manual_seed(seed)
        optimizer.zero_grad(set_to_none=True)
        losses = detector(images, targets)
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def infer_step(detector: nn.Module, images):
    detector.eval()

    def infer():
        with torch.inference_mode():
            return detector(images)

    return infer


# ---------------------------------------------------------------------------------------------
# Host and output


def default_out() -> Path:
    slug = host_slug()
    return RESULTS / f"detect-{slug}_torch{torch.__version__.split('+')[0]}_{time.strftime('%Y-%m-%d')}.csv"


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def parse_size(text: str) -> tuple[int, int]:
    parts = [int(p) for p in re.split(r"[x,]", text.lower())]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 32:
        raise argparse.ArgumentTypeError(f"--size takes N or HxW with sides >= 32, got {text!r}")
    return parts[0], parts[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--detector", default="maskrcnn", choices=["fasterrcnn", "maskrcnn", "retinanet", "fcos"])
    p.add_argument("--model", default="swin_t", help="a Swin V1 variant with a timm twin (swin_t, swin_s, ...)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=parse_size, default=(224, 224), help="N or HxW (default 224)")
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
    p.add_argument("--num-classes", type=int, default=91)
    p.add_argument("--fpn-channels", type=int, default=256)
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of both trunks")
    p.add_argument("--timm-dynamic", action="store_true", help="timm with strict_img_size=False (masks per forward)")
    p.add_argument("--backbone-args", default="", help="SwinConfig overrides, e.g. embed_dim=16,depths=2-2-2-2")
    p.add_argument("--detector-args", default="", help="detector class arguments, e.g. box_batch_size_per_image=64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="CSV to append to (default benchmarks/results/detect-*.csv)")
    return p.parse_args(argv)


def parse_overrides(text: str) -> dict:
    """'embed_dim=16,depths=2-2-2-2,small_map=pad' -> {'embed_dim': 16, 'depths': (2, 2, 2, 2), 'small_map': 'pad'}."""
    import ast

    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        if re.fullmatch(r"\d+(-\d+)+", value):
            out[key] = tuple(int(v) for v in value.split("-"))
        else:
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    H, W = args.size
    side = lambda n: math.ceil(n / 32) * 32
    input_hw = (side(H), side(W))
    backbone_args = {**parse_overrides(args.backbone_args), "drop_path_rate": args.drop_path}
    import timm
    import torchvision

    torch.manual_seed(args.seed)
    ours = create_detector(
        f"{args.detector}_{args.model}_fpn",
        args.num_classes,
        fpn_channels=args.fpn_channels,
        backbone_args=backbone_args,
        **parse_overrides(args.detector_args),
    )
    peer = timm_detector(ours, args.model, input_hw, args.timm_dynamic)
    config = ours.backbone.body.config

    # --- agreement
    g = torch.Generator().manual_seed(args.seed + 1)
    timing_exact = timm_matches(config, input_hw)
    if timing_exact:
        check_hw = input_hw
        body_diff, fpn_diff = compare_features(ours, peer, torch.randn(1, 3, *check_hw, generator=g))
        timing_diff = fpn_diff
    else:
        check_hw = matching_size(config)
        check_body = TimmSwinBody(
            timm_trunk(args.model, ours.backbone.body, check_hw, args.timm_dynamic),
            {i: getattr(peer.backbone.body, f"norm{i}") for i in peer.backbone.body.out_indices},
        )
        body_diff, fpn_diff = compare_features(ours, peer, torch.randn(1, 3, *check_hw, generator=g), check_body)
        del check_body
        _, timing_diff = compare_features(ours, peer, torch.randn(1, 3, *input_hw, generator=g))
    check = "pass" if max(body_diff, fpn_diff) < TOL else "FAIL"
    print(
        f"agreement (eval, one image): backbone maps (after norm0-3) and FPN levels at "
        f"{check_hw[0]}x{check_hw[1]}: max |diff| {body_diff:.2e} / {fpn_diff:.2e} -> {check} (tol {TOL:g})"
    )
    if not timing_exact:
        print(
            f"  at the timing size {input_hw[0]}x{input_hw[1]} timm computes differently (windows not whole: "
            f"it rolls before padding); FPN max |diff| there {timing_diff:.2e}, for information"
        )
    if check != "pass":
        print("WARNING: the two detectors disagree; timings compare different computations", file=sys.stderr)

    # --- timing
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    images, targets = synthetic_batch(args.batch, (H, W), args.num_classes, args.detector == "maskrcnn", args.seed)
    host = {
        "cpu": host_line(),
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
        detector=args.detector,
        model=args.model,
        batch=args.batch,
        height=H,
        width=W,
        num_classes=args.num_classes,
        fpn_channels=args.fpn_channels,
        backbone_args=args.backbone_args,
        detector_args=args.detector_args,
        check=check,
        check_size=f"{check_hw[0]}x{check_hw[1]}",
        check_backbone_max_diff=f"{body_diff:.3e}",
        check_fpn_max_diff=f"{fpn_diff:.3e}",
        timing_size_fpn_max_diff=f"{timing_diff:.3e}",
        timm_trunk="dynamic" if args.timm_dynamic else f"static {input_hw[0]}x{input_hw[1]}",
        **host,
    )
    nets = {"swinx": ours, "timm": peer}
    rows = []
    for mode in modes:
        start = time.perf_counter()
        if mode == "train":
            fns = {k: train_step(net, images, targets, seed=args.seed) for k, net in nets.items()}
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
        f"\n{args.detector} {args.model}, batch {args.batch}, {H}x{W}, {host['threads']} threads, "
        f"{host['cpu']}, torch {host['torch']}, timm {host['timm']}"
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
