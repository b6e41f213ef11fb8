"""The `swinx` command: flags in, one library call per subcommand, results out."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

import swinx
from swinx.classification.data import DataError
from swinx.classification.recipe import TrainError
from swinx.engine.memory import keep_freed_memory
from swinx.engine.threads import THREADS_HELP
from swinx.model.windows import SMALL_MAP_POLICIES
from swinx.weights.checkpoint import CheckpointError, atomic_write
from swinx.weights.layouts import infer_config
from swinx.weights.model_dirs import is_directory_output


def cmd_models(args) -> int:
    names = swinx.list_models(args.filter, aliases=not args.short)
    with torch.device("meta"):
        for name in names:
            model = swinx.create_model(name)
            c = model.config
            params = sum(p.numel() for p in model.parameters())
            print(
                f"{name:48s} V{c.version} embed {c.embed_dim:3d} depths {','.join(map(str, c.depths)):9s} "
                f"window {c.window_size:2d} img {c.img_size}  {params:>12,d} params"
            )
    return 0


def cmd_convert(args) -> int:
    from swinx.weights.checkpoint import BACKBONE_LAYOUTS
    from swinx.weights.layouts import OUTPUT_NORM, normalise_prefix
    from swinx.weights.sources import resolve

    source = resolve(args.source)  # a file of any layout, a transformers or timm model directory, a hub id
    state = source.state
    if args.model is None and source.origin == "swinx" and args.source_layout in ("auto", "swinx"):
        model = swinx.load_model(source.path)
    else:
        layout = source.layout if args.source_layout == "auto" else args.source_layout
        config = source.config if layout == source.layout else infer_config(state, layout)
        if args.model is not None:
            config = swinx.get_config(args.model, num_classes=config.num_classes)
        # A dense backbone (output norms norm{i}, no head) stays one where the target layout can hold it.
        outputs = sorted({int(m[1]) for k in normalise_prefix(state, layout) if (m := OUTPUT_NORM.fullmatch(k))})
        if outputs and config.num_classes == 0 and args.to in BACKBONE_LAYOUTS:
            model = swinx.SwinBackbone(config, out_indices=outputs)
        else:
            model = swinx.SwinTransformer(config)
        print(swinx.load_checkpoint(model, state, layout=layout), file=sys.stderr)
        model.class_names = source.class_names
    backbone = isinstance(model, swinx.SwinBackbone)
    out = Path(args.output)
    if args.to in ("hf", "timm") and is_directory_output(out):
        return _convert_to_model_dir(model, out, args, source.class_names, source.preprocessing)
    if args.to == "swinx" and out.suffix == ".safetensors":
        swinx.save_model(model, out)
    else:
        state = swinx.export_state_dict(model, args.to)
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp))
        else:
            if args.to == "official":
                payload = {"model": state}
            elif args.to == "openmmlab":  # as mmengine saves a model: what mmdet / mmpretrain load_from reads
                meta = {"converted_by": f"swinx {swinx.__version__}", "swinx_config": model.config.to_dict()}
                payload = {"meta": meta, "state_dict": state}
            else:
                payload = state
            atomic_write(out, lambda tmp: torch.save(payload, tmp))
    what = f"backbone, outputs {list(model.out_indices)}" if backbone else f"{model.num_classes} classes"
    print(f"wrote {out} ({args.to} layout, {what})")
    return 0


def _convert_to_model_dir(model, out: Path, args, names: list[str] | None, spec: dict | None) -> int:
    """`swinx convert ... --to hf|timm DIR`: a model directory, with the source's class names and
    preprocessing where it records them (swinx metadata, a model directory's config files)."""
    from swinx.weights.model_dirs import write_model_dir

    if names is not None and len(names) != getattr(model, "num_classes", 0):
        names = None  # the head was replaced (--model with another class count): the names are not its
    written = write_model_dir(model, out, args.to, names, spec, overwrite=args.overwrite)
    peer = "transformers" if args.to == "hf" else "timm"
    files = ", ".join(sorted(p.name for p in written.iterdir()))
    classes = f"{model.num_classes} classes" + (", named" if names else "") if model.num_classes else "no head"
    given = "its own" if spec else "the default"
    print(f"wrote {written}/ ({peer} model directory: {files}; {classes}; {given} preprocessing)")
    return 0


def cmd_serve(args) -> int:
    try:
        from swinx.serve.app import ServeSettings, create_app, run_server
        from swinx.serve.tasks import load_served
    except ImportError as e:
        raise ValueError(f"swinx serve needs FastAPI and uvicorn ({e}): pip install 'swinx[serve]'") from None

    if args.threads:
        torch.set_num_threads(args.threads)
    served = load_served(args.checkpoint, args.device, args.topk, args.threshold)
    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        timeout=args.timeout,
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        token=args.token or None,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.token is None:
        logging.getLogger("swinx").warning(f"serving on {args.host} without a token: anyone who reaches it can use it")
    print(f"serving the {served.task} model {args.checkpoint} ({len(served.classes)} classes) on "
          f"http://{args.host}:{args.port}", flush=True)  # fmt: skip
    run_server(create_app(served, settings), args.host, args.port)
    return 0


def cmd_demo(args) -> int:
    """A smoke run of the core: one model, several input sizes, every checkpoint layout and back."""
    torch.manual_seed(0)
    model = swinx.create_model(args.model).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params:,d} parameters, V{model.config.version}, window {model.config.window_size}")
    with torch.inference_mode():
        for h, w in ((224, 224), (200, 312), (416, 608), (17, 23)):
            x = torch.randn(1, 3, h, w)
            start = time.perf_counter()
            logits = model(x)
            ms = (time.perf_counter() - start) * 1e3
            maps = " ".join(f"{f.shape[2]}x{f.shape[3]}" for f in model.forward_intermediates(x))
            print(f"  input {h:4d}x{w:<4d} -> logits {tuple(logits.shape)}, stage maps {maps}  ({ms:.0f} ms)")
        x = torch.randn(2, 3, 224, 224)
        reference = model(x)
        for layout in swinx.LAYOUTS:
            copy = swinx.create_model(args.model).eval()
            report = swinx.load_checkpoint(copy, swinx.export_state_dict(model, layout))
            copy.small_map = model.small_map
            diff = (copy(x) - reference).abs().max().item()
            print(f"  export -> {layout:11s} -> load (detected {report.layout:11s}): max |diff| {diff:.1e}")
    return 0


TRAIN_HELP = {
    "data": "ImageFolder root with train/<class>/ and val/<class>/ (default: the built-in MNIST 5k digits)",
    "model": "variant or alias to build (swin_t, swinv2_t, ...)",
    "model_args": 'SwinConfig overrides as JSON, e.g. \'{"embed_dim": 64, "depths": [2, 2]}\'',
    "init": "fine-tune from this checkpoint (any layout: official, timm, torchvision, HF, swinx)",
    "lr": "peak learning rate for a global batch of 512; scaled linearly to the real global batch",
    "min_lr": "final learning rate of the cosine schedule (for a global batch of 512)",
    "warmup_lr": "learning rate at step 0 of the linear warm-up (for a global batch of 512)",
    "batch_size": "images per process per micro-batch",
    "accum_steps": "micro-batches per optimizer step",
    "clip_grad": "clip the global gradient norm to this (0: off)",
    "ema_decay": "EMA of the weights (0: off)",
    "layer_decay": "fine-tuning: layer-wise learning-rate decay, SimMIM's / BEiT's rule: the head and final norm "
    "train at --lr, each Swin block below at one more factor of this, the patch embedding at "
    "lr x decay^(blocks + 1); e.g. 0.9 (1: off)",
    "head_lr": "fine-tuning: learning rate of the classifier head for a global batch of 512, scaled like --lr; "
    "unset, the head trains at --lr",
    "freeze_stages": "fine-tuning: freeze the patch embedding and stages 1..N (no gradient, eval mode; 0: none)",
    "linear_probe": "fine-tuning: train only the classifier head; everything else frozen, in eval mode",
    "amp": "auto (bf16 where the device supports it), bf16, fp16 or off",
    "auto_augment": "randaugment, trivialaugment or none",
    "crop_scale": "smallest area of RandomResizedCrop",
    "reprob": "random erasing probability",
    "crop_pct": "evaluation centre-crop fraction",
    "out": "run directory (default runs/<name>-<time>)",
    "workers": "data loader processes (default: follow the machine, none on 1-2 cores)",
    "threads": THREADS_HELP,
    "progress": "progress bar: auto (on a terminal), on or off",
    "max_bad_images": "stop when an epoch has more unreadable images than this (default: skip them all)",
}


def add_config_flags(parser: argparse.ArgumentParser, config_class=None, helps: dict | None = None) -> None:
    """One flag per field of a task's settings dataclass (TrainConfig by default); a flag left out
    keeps the preset, YAML or default value."""
    import dataclasses
    import json

    if config_class is None:
        from swinx.classification.recipe import TrainConfig as config_class
    helps = TRAIN_HELP if helps is None else helps

    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        default = config_class.__dataclass_fields__[f.name]
        value = default.default if default.default is not dataclasses.MISSING else default.default_factory()
        help_text = helps.get(f.name, "")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=float, nargs="+", default=None, help=help_text or "one value per channel")
        elif isinstance(value, list) or str(f.type).startswith("list"):
            parser.add_argument(
                flag, nargs="+", type=_number_or_text, default=None, help=f"{help_text} (default {value})".strip()
            )
        elif isinstance(value, dict):
            parser.add_argument(flag, type=json.loads, default=None, help=help_text)
        elif str(f.type).startswith(("int", "float")):
            kind = float if str(f.type).startswith("float") else int
            parser.add_argument(flag, type=kind, default=None, help=f"{help_text} (default {value})".strip())
        else:
            parser.add_argument(flag, default=None, help=help_text)


def _number_or_text(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


RESUME_KEEPS = ("epochs", "workers", "threads", "progress", "device")  # the flags a resumed run may change


def config_from_args(args, config_class, resolve_config) -> tuple[object, set[str]]:
    """A train command's settings: with --resume the run's config.yaml (only RESUME_KEEPS flags
    apply), else preset, --config YAML and flags via `resolve_config`. Also returns the names of
    the settings the user chose (YAML or flags), which a task may not refit to the data."""
    import dataclasses

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    chosen = {k for k, v in overrides.items() if v is not None}
    if getattr(args, "resume", None):
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ValueError(
                f"{args.resume} is not a swinx run directory (no config.yaml); give the --out "
                "directory of the run to resume"
            )
        return resolve_config(str(saved), {k: overrides[k] for k in RESUME_KEEPS}), chosen
    if getattr(args, "config", None):
        import yaml

        chosen |= set(yaml.safe_load(Path(args.config).read_text()) or {})
    return resolve_config(args.config, overrides), chosen


def cmd_train(args) -> int:
    from swinx.classification.recipe import TrainConfig, resolve_config
    from swinx.classification.train import train

    config, chosen = config_from_args(args, TrainConfig, resolve_config)
    train(config, resume=args.resume, distributed=int(os.environ.get("WORLD_SIZE", "1")) > 1, chosen=chosen)
    return 0


def cmd_eval(args) -> int:
    from swinx.classification.inference import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        confusion_png=args.confusion,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['images']:,} images from {report['data']}  (skipped {report['skipped_images']} unreadable)")
    print(f"top-1 {report['acc1']:.2f}%  top-5 {report['acc5']:.2f}%  loss {report['loss']:.4f}")
    per_class = report["per_class_acc1"]
    width = max(map(len, per_class), default=5)
    for name, acc in per_class.items():
        print(f"  {name:{width}s}  {acc:6.2f}%")
    if "confusion_png" in report:
        print(f"confusion matrix: {report['confusion_png']}")
    return 0


def cmd_predict(args) -> int:
    from swinx.classification.inference import load_for_inference, predict, predict_onnx

    if args.onnx:
        results = predict_onnx(args.onnx, args.images, topk=args.topk)
    else:
        results = predict(load_for_inference(args.checkpoint, args.device), args.images, topk=args.topk)
    failed = sum("error" in r for r in results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['image']}: error: {r['error']}", file=sys.stderr)
                continue
            print(f"{r['image']}:")
            for t in r["top"]:
                print(f"  {t['probability'] * 100:6.2f}%  {t['class']}")
    return 1 if failed else 0


def cmd_flops(args) -> int:
    from swinx.tools.flops import counted_flops, macs

    model = swinx.create_model(args.model, **({"img_size": args.img_size} if args.img_size else {}))
    size = args.img_size or model.config.img_hw[0]
    parts = macs(model.config, size)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model} at {size}x{size}: {params:,} parameters, "
        f"{sum(p.macs for p in parts) / 1e9:.3f} GMACs (official convention)"
    )
    counted = counted_flops(model, size) if args.counted else {}
    for p in parts:
        extra = f"   flop_counter {counted.get(p.name, 0) / 2e9:8.3f} GMACs" if counted else ""
        print(f"  {p.name:12s} map {p.height:4d}x{p.width:<4d} {p.macs / 1e9:8.3f} GMACs{extra}")
    if counted:
        print(
            f"  torch.utils.flop_counter total: {counted['total'] / 2e9:.3f} GMACs "
            "(matmuls and the patch convolution; norms, softmax and GELU are not counted)"
        )
    return 0


def cmd_bench(args) -> int:
    from swinx.tools import bench

    if args.scaling:
        rows = bench.scaling(args.model, sizes=args.sizes, device=args.device, repeats=args.repeats)
        title = f"{args.model}: shifted windows against global attention ({torch.get_num_threads()} threads)"
        out = Path(args.out_dir) / f"scaling-{args.model}.png"
        bench.plot_scaling(rows, out, title)
        for r in rows:
            glob = f"{r['global_ms']:9.1f}" if r["global_ms"] is not None else "        -"
            print(
                f"{r['img_size']:5d}px {r['tokens']:6d} tokens  swin {r['swin_ms']:9.1f} ms "
                f"{r['swin_gmacs']:8.2f} GMACs   global {glob} ms {r['global_gmacs']:9.2f} GMACs"
            )
        print(f"wrote {out}")
        return 0
    device = torch.device(args.device)
    from swinx.tools.host import host_line

    where = (
        f"{bench.device_name(device)}, {torch.get_num_threads()} CPU threads" if device.type == "cuda" else host_line()
    )
    print(f"{where}, torch {torch.__version__}")
    if device.type == "cpu":
        from swinx.model import native

        print("swinx C kernels: " + ("built for this CPU" if native.library() else f"not used ({native.reason()})"))
    rates = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        kernels = bench.matmul_rate(dtype, device)
        rates[name] = max(kernels.values())
        print(
            f"  dense matmul {name}: "
            + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in kernels.items())
            + "  (the best is the roofline)"
        )
    impls = ("swinx",) + (bench.PEERS if args.compare else ()) + (("onnxruntime",) if args.onnx else ())
    rows = []
    for mode, dtype in [(m, d) for m in args.mode for d in args.dtype]:
        spec = bench.BenchSpec(
            model=args.model,
            batch=args.batch,
            img_size=args.img_size,
            mode=mode,
            dtype=dtype,
            compile=args.compile,
            device=args.device,
            repeats=args.repeats,
        )
        results = bench.compare(spec, impls, memory=not args.no_memory, roofline=rates[dtype])
        rows += [r.row() for r in results]
        print(
            f"{mode}: {args.model} batch {spec.batch} at {results[0].img_size}, {dtype}"
            f"{', compiled' if args.compile else ''} (median of {args.repeats} interleaved rounds)"
        )
        for r in results:
            memory = f"{r.peak_memory_mb:6.0f} MB" if r.peak_memory_mb is not None else "     -   "
            print(
                f"  {r.impl:12s} {r.median_ms:9.1f} ms {r.images_per_second:8.1f} img/s  "
                f"swinx is {r.speedup_of_swinx:5.2f}x  peak {memory}  |diff| {r.max_abs_diff:.1e}  "
                f"{100 * r.fraction_of_matmul_peak:5.1f}% of matmul peak"
            )
    for mode in args.mode:
        ours = {r["dtype"]: r["median_ms"] for r in rows if r["impl"] == "swinx" and r["mode"] == mode}
        if len(ours) == 2:
            print(f"{mode}: swinx bfloat16 is {ours['float32'] / ours['bfloat16']:.2f}x its float32")
    for row in rows:
        row["matmul_gflops"] = rates[row["dtype"]] / 1e9
    if args.json:
        print(json.dumps(rows, indent=2))
    if args.out_dir:
        print(f"appended to {bench.record(rows, args.out_dir, device)}")
    return 0


def cmd_export(args) -> int:
    from swinx.classification.inference import default_input_spec, load_for_inference
    from swinx.tools import export

    if args.checkpoint:
        loaded = load_for_inference(args.checkpoint)
        model, extra = loaded.model, {"input": loaded.input}
        model.class_names = loaded.class_names
    else:
        model = swinx.create_model(args.model)
        extra = {"input": default_input_spec(model.config)}
    sizes = [_parse_size(s) for s in args.verify_sizes] if args.verify_sizes else None
    if args.format == "onnx":
        report = export.export_onnx(
            model,
            args.output,
            opset=args.opset,
            attention=args.attention,
            sizes=sizes,
            batches=args.verify_batches,
            extra_metadata=extra,
        )
    else:
        report = export.export_program(
            model, args.output, attention=args.attention, sizes=sizes, batches=args.verify_batches, extra_metadata=extra
        )
    print(
        f"wrote {report.path} ({args.format}, {args.attention} attention, {report.seconds:.1f} s): dynamic batch, "
        f"height and width {report.min_side}..{export.MAX_SIDE}"
    )
    runtime = "onnxruntime" if args.format == "onnx" else "torch.export.load"
    for check in report.checks:
        print(f"  {runtime} vs PyTorch, {check}")
    print(f"verified: max |diff| {report.max_abs_diff:.1e} <= {export.TOLERANCE:g} on {len(report.checks)} runs")
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    """'224' or '200x312' -> (height, width)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise ValueError(f"size {text!r} is not N or HxW (e.g. 224 or 200x312)")
    return (parts[0], parts[-1])


def cmd_viz(args) -> int:
    from swinx.tools import viz

    if args.what == "windows":
        out = viz.draw_windows(args.image, args.out, args.model, size=args.size, small_map=args.small_map, dpi=args.dpi)
    elif args.what == "mask":
        out = viz.draw_mask(
            args.out, args.model, size=args.size, stage=args.stage, small_map=args.small_map, dpi=args.dpi
        )
    elif args.what == "attention":
        out = viz.draw_attention(
            args.checkpoint,
            args.image,
            args.out,
            stage=args.stage,
            block=args.block,
            head=None if args.all_heads else args.head,
            query=tuple(args.query) if args.query else None,
            size=args.size,
            interpolation=args.interpolation,
            dpi=args.dpi,
        )
    elif args.what == "bias":
        out = viz.draw_bias(args.checkpoint, args.out, stage=args.stage, block=args.block, dpi=args.dpi)
    else:
        print(viz.model_summary(args.name, args.size, name=args.name), end="")
        if not args.out:
            return 0
        out = viz.draw_model(args.name, args.out, size=args.size, name=args.name, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swinx", description="Swin Transformer V1/V2 tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the named variants and aliases with parameter counts")
    p.add_argument("filter", nargs="?", default="", help="substring to filter names")
    p.add_argument("--short", action="store_true", help="only the short names (swin_t, ...)")
    p.set_defaults(run=cmd_models)

    p = sub.add_parser("convert", help="rewrite a checkpoint in another layout")
    p.add_argument(
        "source",
        help="checkpoint file (.pth, .pt, .bin, .safetensors) of any known layout, a transformers or timm model "
        "directory, or a hub id (microsoft/swin-tiny-patch4-window7-224, timm/...; offline from the local cache)",
    )
    p.add_argument(
        "output",
        help="output file: .safetensors, or a torch file (.pth, .pt, .bin); with --to hf or timm, a name without "
        "such a suffix (or an existing directory) is written as a model directory",
    )
    p.add_argument(
        "--to",
        required=True,
        choices=swinx.LAYOUTS,
        help="layout to write; hf and timm into a directory write config.json and model.safetensors (and "
        "hf's preprocessor_config.json) that transformers' from_pretrained and timm.create_model('local-dir:...') "
        "load, with the source's class names and preprocessing",
    )
    p.add_argument("--model", help="variant of the source (e.g. swin_t); by default read off the checkpoint's shapes")
    p.add_argument("--source-layout", default="auto", choices=("auto",) + swinx.LAYOUTS)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output directory swinx did not write (by default only an empty one or one of ours is "
        "replaced; files are always replaced)",
    )
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("train", help="train or fine-tune (default: a small Swin on the built-in MNIST digits)")
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    add_config_flags(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5, loss, per-class accuracy and a confusion matrix")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument(
        "--data",
        help="ImageFolder root (its val/ split) or a folder of class folders; "
        "default: the data the checkpoint was trained on",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--confusion",
        help="where to write the confusion-matrix PNG (default: beside the checkpoint, for up to 50 classes)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of image files")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint file or run directory")
    source.add_argument("--onnx", help="ONNX file from `swinx export`, run with onnxruntime")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP, ...; any size and mode)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("bench", help="throughput, latency and memory, against timm and torchvision with --compare")
    p.add_argument("--model", default="swin_t")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, help="default: the variant's")
    p.add_argument(
        "--mode",
        nargs="+",
        choices=("infer", "train"),
        default=["infer"],
        help="inference forward, or a training step (forward, backward, AdamW)",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=("float32", "bfloat16"),
        default=["float32"],
        help="bfloat16: autocast; give both to see our bfloat16 over float32",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every implementation")
    p.add_argument("--compare", action="store_true", help="also timm and torchvision, same weights, interleaved")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also our ONNX export in onnxruntime (float32 inference on the CPU; exports first, ~40 s)",
    )
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds; medians are reported")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory measurement (CPU: peak RSS of a fresh process per implementation)",
    )
    p.add_argument("--scaling", action="store_true", help="time against input size, windowed vs global attention")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 320, 448, 640, 800, 1024])
    p.add_argument("--out-dir", default="benchmarks/results", help="CSV results and pictures go here ('' for none)")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("flops", help="parameters and multiply-accumulates per stage (official convention)")
    p.add_argument("model")
    p.add_argument("--img-size", type=int)
    p.add_argument("--counted", action="store_true", help="also count with torch.utils.flop_counter")
    p.set_defaults(run=cmd_flops)

    from swinx.tools.export import ATTENTION, FORMATS

    p = sub.add_parser("export", help="ONNX or torch.export program for any input size, verified after writing")
    p.add_argument("output", help="file to write (.onnx, or .pt2 for torch-export)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint file or run directory (any layout)")
    source.add_argument("--model", help="a variant with fresh random weights (e.g. swin_t), for trying the graph")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18 or later; 23 has the Attention operator)")
    p.add_argument(
        "--attention",
        choices=ATTENTION,
        default="fused",
        help="fused: scaled_dot_product_attention (ONNX Attention from opset 23); "
        "exact: explicit softmax(q k^T + bias) v",
    )
    p.add_argument(
        "--verify-sizes",
        nargs="+",
        metavar="HxW",
        help="sizes to check after export (default, for a model of size s: s, 8s/7, 25s/28x39s/28, 12s/7)",
    )
    p.add_argument("--verify-batches", type=int, nargs="+", default=[1, 5], metavar="B")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser(
        "viz",
        help="pictures of the inside: windows, shift masks, attention, position bias, summary",
        description="Stages are numbered from 1 (as in the paper); blocks, heads and token positions from 0.",
    )
    views = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    size = dict(type=int, nargs=2, metavar=("H", "W"))
    v = views.add_parser("windows", help="the image with every stage's token and window grids, regular and shifted")
    v.add_argument("image", help="image file (any size; drawn at its own size unless --size)")
    v.add_argument("--model", default="swin_t", help="variant or alias whose geometry to draw")
    v.add_argument("--size", **size, help="resize the image to H W first")
    v.add_argument("--small-map", choices=SMALL_MAP_POLICIES, help="small-map rule (default: the model's)")
    v.add_argument("--out", required=True, help="PNG to write")
    v.add_argument("--dpi", type=int, default=120)
    v = views.add_parser("mask", help="a stage's shifted-window attention mask (which tokens may attend to which)")
    v.add_argument("--model", default="swin_t", help="variant or alias")
    v.add_argument("--size", **size, help="input image size (default: the model's)")
    v.add_argument("--stage", type=int, default=1, help="stage, from 1 (default 1)")
    v.add_argument("--small-map", choices=SMALL_MAP_POLICIES, help="small-map rule (default: the model's)")
    v.add_argument("--out", required=True, help="PNG to write")
    v.add_argument("--dpi", type=int, default=130)
    v = views.add_parser("attention", help="a block's attention maps stitched back onto the image")
    v.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (any layout)")
    v.add_argument("image", help="image file, run at its own size (or --size)")
    v.add_argument("--stage", type=int, default=1, help="stage, from 1 (default 1)")
    v.add_argument("--block", type=int, default=0, help="block in the stage, from 0; odd blocks shift (default 0)")
    heads = v.add_mutually_exclusive_group()
    heads.add_argument("--head", type=int, default=0, help="head, from 0 (default 0)")
    heads.add_argument("--all-heads", action="store_true", help="every head of the block, in a grid")
    v.add_argument(
        "--query",
        type=int,
        nargs=2,
        metavar=("ROW", "COL"),
        help="token row and column (from 0) in the stage's map; default: the mean attention each "
        "token receives from its window",
    )
    v.add_argument("--size", **size, help="resize the image to H W first")
    v.add_argument(
        "--interpolation",
        choices=("nearest", "bilinear"),
        default="nearest",
        help="token map to pixels (default nearest: one flat square per token)",
    )
    v.add_argument("--out", required=True, help="PNG to write")
    v.add_argument("--dpi", type=int, default=130)
    v = views.add_parser("bias", help="each head's relative position bias as a (2M-1)x(2M-1) image")
    v.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (any layout)")
    v.add_argument("--stage", type=int, default=1, help="stage, from 1 (default 1)")
    v.add_argument("--block", type=int, default=0, help="block in the stage, from 0 (default 0)")
    v.add_argument("--out", required=True, help="PNG to write")
    v.add_argument("--dpi", type=int, default=130)
    v = views.add_parser("model", help="architecture summary: stages, maps, windows, shifts, params, GMACs")
    v.add_argument("name", help="variant or alias (swin_t, swinv2_t, swin_base_patch4_window12_384, ...)")
    v.add_argument("--size", **size, help="input image size (default: the model's)")
    v.add_argument("--out", help="also draw it as a PNG")
    v.add_argument("--dpi", type=int, default=130)
    p.set_defaults(run=cmd_viz)

    from swinx.detection.cli import add_detect_parser

    add_detect_parser(sub)

    from swinx.segmentation.cli import add_segment_parser

    add_segment_parser(sub)

    p = sub.add_parser("serve", help="HTTP inference server with dynamic batching (FastAPI under uvicorn)")
    p.add_argument("--checkpoint", required=True, help="a classifier, detector or segmenter: run directory or "
                   "checkpoint file (a classifier also: model directory or hub id)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="most images per model call")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (ms)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; beyond: 503")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait for its answer (504)")
    p.add_argument("--max-bytes", type=int, default=20 * 2**20, help="largest upload (413)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, from its header (413)")
    p.add_argument("--topk", type=int, default=5, help="classes per answer (a classifier)")
    p.add_argument("--threshold", type=float, default=0.5, help="lowest score of a box in the answer (a detector)")
    p.add_argument("--threads", type=int, help="torch compute threads (default: torch's)")
    p.add_argument("--token", default=os.environ.get("SWINX_TOKEN"), help="require 'Authorization: Bearer TOKEN' "
                   "(default: $SWINX_TOKEN; none)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("demo", help="smoke demo: any input size, every checkpoint layout")
    p.add_argument("--model", default="swin_t")
    p.set_defaults(run=cmd_demo)
    return parser


class _ConsoleHandler(logging.Handler):
    """The library's log lines as plain text: information on stdout, warnings on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        print(self.format(record), file=stream, flush=True)


def _console_logging() -> None:
    logger = logging.getLogger("swinx")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _ConsoleHandler)] + [_ConsoleHandler()]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _console_logging()
    keep_freed_memory()
    try:
        return args.run(args)
    except (CheckpointError, DataError, TrainError, ValueError, TypeError, OSError) as e:
        command = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
        print(f"swinx {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"swinx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
