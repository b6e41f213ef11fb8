"""`swinx segment train | eval | predict | make-scenes`: flags in, one library call each."""

from __future__ import annotations

import json
import os

from swinx.engine.threads import THREADS_HELP

SEGMENT_HELP = {
    "data": "dataset root: images/{train,val}/ with annotations/{train,val}/*.png class-index masks, as ADE20K "
    "(default: the built-in digit scenes)",
    "num_classes": "number of classes (default: from the classes file, else the largest label + 1)",
    "classes": "class names: .txt (one per line) or .json (a list, or {classes, palette}) (default: ROOT/classes.*)",
    "ignore_index": "label value left out of the loss and the metrics",
    "reduce_zero_label": "ADE20K's convention: label 0 is ignored and the others shift down by one",
    "model": "backbone variant (swin_t, swinv2_t, ...)",
    "model_args": "backbone SwinConfig overrides as JSON, e.g. '{\"embed_dim\": 64}'",
    "small_map": "small-map rule: clamp (official), pad (torchvision), pad_shift (OpenMMLab)",
    "channels": "UperNet decoder width",
    "aux_channels": "auxiliary FCN head width on stage 3 (0: none)",
    "norm": "heads' normalisation: bn (mmsegmentation) or gn",
    "init": "backbone weights from a classification or OpenMMLab checkpoint (any layout, a swinx train run "
    "too), or a whole swinx segmenter",
    "crop_size": "training crop, N or HxW",
    "base_size": "short side that the random rescale ratio multiplies",
    "ratio_range": "random rescale ratios, low high",
    "img_size": "evaluation size, N or HxW (default: each image's own size)",
    "eval_mode": "validation inference: whole or slide",
    "eval_crop": "sliding window, N or HxW (default: the crop size)",
    "eval_stride": "sliding stride, N or HxW (default: 2/3 of the window)",
    "eval_sizes": "more evaluation sizes, run on the best weights after training (written to eval.json)",
    "eval_modes": "modes scored after training: whole and/or slide",
    "lr": "peak learning rate for a global batch of 16; scaled linearly to the real global batch",
    "val_every": "score the validation split every N epochs (and at the last)",
    "workers": "data loader processes (default: none on 1-2 cores, else up to 4)",
    "threads": THREADS_HELP,
    "out": "run directory (default runs/segment-<name>-<time>)",
    "progress": "progress bar: auto (on a terminal), on or off",
    "max_bad_images": "stop when an epoch has more unreadable images than this (default: skip them all)",
}


def _settings(args, loaded):
    """Inference settings from the flags, defaulting to the run's own evaluation settings."""
    from swinx.engine.config import parse_size
    from swinx.segmentation.inference import InferenceSettings

    run = loaded.settings
    crop = parse_size(args.crop or run.get("crop") or "512")
    stride = args.stride or run.get("stride")
    return InferenceSettings(
        size=None,
        mode=args.mode or run.get("mode") or "whole",
        crop=crop,
        stride=parse_size(stride) if stride else (-(-crop[0] * 2 // 3), -(-crop[1] * 2 // 3)),
        scales=args.scales or [1.0],
        flip=args.flip,
        batch_size=args.batch_size,
    )


def _sizes(args, loaded) -> list:
    from swinx.engine.config import parse_size

    sizes = args.img_size or [loaded.settings.get("img_size")]
    return [None if s in (None, "native") else parse_size(s) for s in sizes]


def cmd_train(args) -> int:
    from swinx.cli import config_from_args
    from swinx.segmentation.train import SegmentConfig, resolve_config, train

    config, chosen = config_from_args(args, SegmentConfig, resolve_config)
    train(config, resume=args.resume, distributed=int(os.environ.get("WORLD_SIZE", "1")) > 1, chosen=chosen)
    return 0


def cmd_eval(args) -> int:
    import dataclasses

    from swinx.segmentation.inference import eval_dataset, evaluate_segmenter, load_segmenter
    from swinx.segmentation.train import eval_report

    loaded = load_segmenter(args.checkpoint, args.device)
    dataset = eval_dataset(loaded, args.data)
    base = _settings(args, loaded)
    reports = []
    for size in _sizes(args, loaded):
        settings = dataclasses.replace(base, size=size)
        result = evaluate_segmenter(loaded.model, dataset, loaded.classes, settings, device=args.device)
        reports.append(eval_report(result, settings))
        if not args.json:
            scores = f"mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  aAcc {result['aAcc']:.2f}"
            print(f"{settings.describe()}: {scores}")
            print(
                "  per-class IoU: "
                + "  ".join(
                    f"{k} {'-' if v['IoU'] is None else format(v['IoU'], '.1f')}"
                    for k, v in result["per_class"].items()
                )
            )
            if result["skipped"]:
                print(f"  skipped {result['skipped']} unreadable image(s)")
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 0


def cmd_predict(args) -> int:
    import dataclasses

    from swinx.segmentation.inference import load_segmenter, predict

    loaded = load_segmenter(args.checkpoint, args.device)
    settings = dataclasses.replace(_settings(args, loaded), size=_sizes(args, loaded)[0] if args.img_size else None)
    results = predict(loaded, args.images, settings, out_dir=args.out, alpha=args.alpha)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['image']}: {r['error']}")
                continue
            shares = ", ".join(f"{k} {v:.1f}%" for k, v in sorted(r["classes"].items(), key=lambda kv: -kv[1]))
            line = f"{r['image']} ({r['width']}x{r['height']}): {shares}"
            if "mask" in r:
                line += f"  (mask: {r['mask']}, overlay: {r['overlay']})"
            print(line)
    return 1 if any("error" in r for r in results) else 0


def cmd_make_scenes(args) -> int:
    from swinx.segmentation.scenes import make_scenes

    out = make_scenes(
        args.out, train_scenes=args.train_scenes, val_scenes=args.val_scenes, size=args.size, seed=args.seed
    )
    print(
        f"wrote the digit scenes with per-pixel labels to {out} "
        "(images/{train,val}/, annotations/{train,val}/ class-index PNGs, classes.json)"
    )
    return 0


def _inference_flags(p, batch_default: int = 8) -> None:
    p.add_argument("--mode", choices=("whole", "slide"), help="whole image, or sliding window (default: the run's)")
    p.add_argument("--crop", help="sliding window, N or HxW (default: the run's)")
    p.add_argument("--stride", help="sliding stride, N or HxW (default: the run's, else 2/3 of the window)")
    p.add_argument("--scales", type=float, nargs="+", help="test-time scales, ratios of the size, e.g. 0.75 1 1.25")
    p.add_argument("--flip", action="store_true", help="test-time horizontal flip (averaged with the original)")
    p.add_argument("--batch-size", type=int, default=batch_default, help="windows or images per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")


def add_segment_parser(sub) -> None:
    from swinx.cli import add_config_flags
    from swinx.segmentation import scenes
    from swinx.segmentation.train import SegmentConfig

    p = sub.add_parser("segment", help="semantic segmentation with UperNet on Swin, at any input size")
    actions = p.add_subparsers(dest="action", required=True)

    t = actions.add_parser("train", help="train a segmenter (default: the digit scenes, no download)")
    t.add_argument("--config", help="YAML file of settings (flags override it)")
    t.add_argument("--resume", help="run directory to continue")
    add_config_flags(t, SegmentConfig, SEGMENT_HELP)
    t.set_defaults(run=cmd_train)

    e = actions.add_parser("eval", help="mIoU, mAcc, aAcc and per-class IoU of a trained segmenter, at any size")
    e.add_argument("--checkpoint", required=True, help="run directory or segmenter .safetensors")
    e.add_argument("--data", help="dataset root (default: the held-out digit scenes)")
    e.add_argument("--img-size", nargs="+", help="evaluation size(s), N or HxW, or native (default: the run's)")
    _inference_flags(e)
    e.set_defaults(run=cmd_eval)

    r = actions.add_parser("predict", help="class-index PNGs, colour overlays and a summary for image files")
    r.add_argument("--checkpoint", required=True, help="run directory or segmenter .safetensors")
    r.add_argument("images", nargs="+", help="image files, any format and size")
    r.add_argument("--img-size", nargs=1, help="resize to N or HxW first (default: the image's own size)")
    r.add_argument("--out", help="directory for <name>.png (class indices) and <name>_overlay.png")
    r.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    _inference_flags(r)
    r.set_defaults(run=cmd_predict)

    s = actions.add_parser("make-scenes", help="write the digit scenes with per-pixel labels (the default data)")
    s.add_argument("out", help="directory to write")
    s.add_argument("--train-scenes", type=int, default=scenes.TRAIN_SCENES)
    s.add_argument("--val-scenes", type=int, default=scenes.VAL_SCENES)
    s.add_argument("--size", type=int, default=scenes.SCENE_SIZE)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=cmd_make_scenes)
