"""The `swinx` command: flags in, one library call per subcommand, results out."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import swinx
from swinx.checkpoint import CheckpointError, atomic_write, read_metadata, read_state_dict
from swinx.layouts import detect_layout, infer_config


def cmd_models(args) -> int:
    names = swinx.list_models(args.filter, aliases=not args.short)
    with torch.device("meta"):
        for name in names:
            model = swinx.create_model(name)
            c = model.config
            params = sum(p.numel() for p in model.parameters())
            print(f"{name:48s} V{c.version} embed {c.embed_dim:3d} depths {','.join(map(str, c.depths)):9s} "
                  f"window {c.window_size:2d} img {c.img_size}  {params:>12,d} params")
    return 0


def cmd_convert(args) -> int:
    source = Path(args.source)
    state, wrapped = read_state_dict(source)
    if args.model is None and source.suffix == ".safetensors" and "config" in read_metadata(source):
        model = swinx.load_model(source)
    else:
        layout = detect_layout(state, wrapped) if args.source_layout == "auto" else args.source_layout
        config = infer_config(state, layout)
        if args.model is not None:
            config = swinx.get_config(args.model, num_classes=config.num_classes)
        model = swinx.SwinTransformer(config)
        print(swinx.load_checkpoint(model, state, layout=layout), file=sys.stderr)
    out = Path(args.output)
    if args.to == "swinx" and out.suffix == ".safetensors":
        swinx.save_model(model, out)
    else:
        state = swinx.export_state_dict(model, args.to)
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp))
        else:
            payload = {"model": state} if args.to == "official" else state
            atomic_write(out, lambda tmp: torch.save(payload, tmp))
    print(f"wrote {out} ({args.to} layout, {model.num_classes} classes)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swinx", description="Swin Transformer V1/V2 tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the named variants and aliases with parameter counts")
    p.add_argument("filter", nargs="?", default="", help="substring to filter names")
    p.add_argument("--short", action="store_true", help="only the short names (swin_t, ...)")
    p.set_defaults(run=cmd_models)

    p = sub.add_parser("convert", help="rewrite a checkpoint in another layout")
    p.add_argument("source", help="checkpoint file (.pth, .pt, .bin, .safetensors) of any known layout")
    p.add_argument("output", help="output file; .safetensors or a torch file")
    p.add_argument("--to", required=True, choices=swinx.LAYOUTS, help="layout to write")
    p.add_argument("--model", help="variant of the source (e.g. swin_t); by default read off the checkpoint's shapes")
    p.add_argument("--source-layout", default="auto", choices=("auto",) + swinx.LAYOUTS)
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("demo", help="smoke demo: any input size, every checkpoint layout")
    p.add_argument("--model", default="swin_t")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, ValueError, TypeError, FileNotFoundError, PermissionError) as e:
        print(f"swinx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
