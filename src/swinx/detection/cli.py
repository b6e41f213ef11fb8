"""`swinx detect train | eval | predict | make-scenes`: flags in, one library call each."""

from __future__ import annotations

import json
import os

from swinx.engine.threads import THREADS_HELP

DETECT_HELP = {
    "data": "COCO root: annotations/instances_{train,val}*.json beside {train,val}*/ image folders "
    "(default: the built-in digit scenes)",
    "detector": "fasterrcnn, maskrcnn, retinanet or fcos (torchvision's)",
    "model": "backbone variant (swin_t, swinv2_t, ...)",
    "model_args": "backbone SwinConfig overrides as JSON, e.g. '{\"embed_dim\": 64}'",
    "small_map": "small-map rule: clamp (official), pad (torchvision), pad_shift (OpenMMLab detectors)",
    "init": "backbone weights from a classification checkpoint (any layout, a swinx train run too), "
    "or a whole swinx detector",
    "train_sizes": "short sides for multi-scale training, one drawn per batch",
    "img_size": "evaluation size, N or HxW (default: each image's own size)",
    "eval_sizes": "more evaluation sizes, run on the best weights after training (written to eval.json)",
    "lr": "peak learning rate for a global batch of 16; scaled linearly to the real global batch",
    "schedule": "step (x0.1 at --milestones epochs) or cosine",
    "val_every": "score the validation split every N epochs (and at the last)",
    "workers": "data loader processes (default: none on 1-2 cores, else up to 4)",
    "threads": THREADS_HELP,
    "out": "run directory (default runs/detect-<name>-<time>)",
    "progress": "progress bar: auto (on a terminal), on or off",
    "max_bad_images": "stop when an epoch has more unreadable images than this (default: skip them all)",
}


def cmd_train(args) -> int:
    from swinx.cli import config_from_args
    from swinx.detection.train import DetectConfig, resolve_config, train

    config, chosen = config_from_args(args, DetectConfig, resolve_config)
    train(config, resume=args.resume, distributed=int(os.environ.get("WORLD_SIZE", "1")) > 1, chosen=chosen)
    return 0


def cmd_eval(args) -> int:
    from swinx.detection.inference import evaluate_checkpoint

    reports = evaluate_checkpoint(
        args.checkpoint, args.data, sizes=args.img_size, batch_size=args.batch_size, device=args.device
    )
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        return 0
    for report in reports:
        print(f"size {report['img_size'] or 'native'}:")
        for kind in ("bbox", "segm"):
            if kind in report:
                r = report[kind]
                print(
                    f"  {kind:4s} AP {r['AP']:.3f}  AP50 {r['AP50']:.3f}  AP75 {r['AP75']:.3f}  "
                    f"APs {r['APs']:.3f}  APm {r['APm']:.3f}  APl {r['APl']:.3f}"
                )
        per_class = report["bbox"]["per_class"]
        print(
            "  per-class box AP: "
            + "  ".join(f"{k} {'-' if v is None else format(v, '.3f')}" for k, v in per_class.items())
        )
        if report["skipped_images"]:
            print(f"  skipped {report['skipped_images']} unreadable image(s)")
    return 0


def cmd_predict(args) -> int:
    from swinx.detection.inference import load_detector, predict
    from swinx.detection.train import parse_size

    loaded = load_detector(args.checkpoint, args.device)
    size = parse_size(args.img_size) if args.img_size else None
    results = predict(loaded, args.images, score_threshold=args.threshold, size=size, draw_dir=args.draw)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['image']}: {r['error']}")
                continue
            found = (
                ", ".join(f"{d['class']} {d['score']:.2f} at {[round(v) for v in d['box']]}" for d in r["detections"])
                or "nothing"
            )
            print(f"{r['image']}: {found}" + (f"  (drawn: {r['drawing']})" if "drawing" in r else ""))
    return 1 if any("error" in r for r in results) else 0


def cmd_make_scenes(args) -> int:
    from swinx.detection.scenes import make_scenes

    out = make_scenes(
        args.out, train_scenes=args.train_scenes, val_scenes=args.val_scenes, size=args.size, seed=args.seed
    )
    print(f"wrote the digit scenes, a COCO dataset, to {out} (annotations/instances_{{train,val}}.json, train/, val/)")
    return 0


def add_detect_parser(sub) -> None:
    from swinx.cli import add_config_flags
    from swinx.detection import scenes
    from swinx.detection.train import DetectConfig

    p = sub.add_parser("detect", help="object detection and instance segmentation on torchvision's detectors")
    actions = p.add_subparsers(dest="action", required=True)

    t = actions.add_parser("train", help="train a detector (default: the digit scenes, no download)")
    t.add_argument("--config", help="YAML file of settings (flags override it)")
    t.add_argument("--resume", help="run directory to continue")
    add_config_flags(t, DetectConfig, DETECT_HELP)
    t.set_defaults(run=cmd_train)

    e = actions.add_parser("eval", help="COCO box (and mask) AP of a trained detector, at any size")
    e.add_argument("--checkpoint", required=True, help="run directory or detector .safetensors")
    e.add_argument("--data", help="COCO root (default: the held-out digit scenes)")
    e.add_argument("--img-size", nargs="+", help="evaluation size(s), N or HxW, or native (default: the run's)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true", help="print pycocotools' metrics as JSON, fractions in [0, 1]")
    e.set_defaults(run=cmd_eval)

    r = actions.add_parser("predict", help="boxes, labels, scores (and masks) for image files")
    r.add_argument("--checkpoint", required=True, help="run directory or detector .safetensors")
    r.add_argument("images", nargs="+", help="image files, any format and size")
    r.add_argument("--threshold", type=float, default=0.5, help="lowest score shown (default 0.5)")
    r.add_argument("--img-size", help="resize to N or HxW first (default: the image's own size)")
    r.add_argument("--draw", help="directory for PNGs with the detections drawn")
    r.add_argument("--device", default="cpu")
    r.add_argument("--json", action="store_true")
    r.set_defaults(run=cmd_predict)

    s = actions.add_parser("make-scenes", help="write the digit scenes (the default training data) as COCO")
    s.add_argument("out", help="directory to write")
    s.add_argument("--train-scenes", type=int, default=scenes.TRAIN_SCENES)
    s.add_argument("--val-scenes", type=int, default=scenes.VAL_SCENES)
    s.add_argument("--size", type=int, default=scenes.SCENE_SIZE)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=cmd_make_scenes)
