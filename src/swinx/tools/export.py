"""Export for deployment: ONNX and torch.export programs with dynamic batch, height and width.

One export serves every input size. Exported, each block runs `indexed_window_attention`:
padding, the cyclic shift, the window partition and the small-map rules become index
arithmetic on the symbolic sizes, so the graph has no branch on the size and changes its
windows, shifts and masks for each input as the eager model does. Every export is checked
after writing: the file is loaded back (onnxruntime, or torch.export.load) and compared with
the PyTorch model on several sizes and batch sizes.
"""

from __future__ import annotations

import copy
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swinx.model.swin import SwinTransformer
from swinx.weights.checkpoint import atomic_write

FORMATS = ("onnx", "torch-export")
ATTENTION = ("fused", "exact")
MAX_SIDE = 8192
TOLERANCE = 1e-4
METADATA_KEY = "swinx"


class ExportError(ValueError):
    """An export that cannot be made, or that does not reproduce the model."""


@dataclass
class Check:
    """One verification run: the exported file against the PyTorch model on a random input."""

    batch: int
    height: int
    width: int
    max_abs_diff: float
    seconds: float

    def __str__(self) -> str:
        return (
            f"batch {self.batch} at {self.height}x{self.width}: max |diff| {self.max_abs_diff:.1e} "
            f"({self.seconds * 1e3:.0f} ms)"
        )


@dataclass
class ExportReport:
    path: Path
    format: str
    seconds: float
    min_side: int
    checks: list[Check] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=0.0)


def min_side(model: SwinTransformer) -> int:
    """The smallest height or width an export accepts: every stage map at least 2 tokens wide.

    (A 1-token map would make size-1 dimensions that the symbolic shape checks specialise on.)
    """
    c = model.config
    return c.patch_size * 2 ** (len(c.depths) - 1) + 1


def example_side(model: SwinTransformer) -> int:
    """The traced example: every stage map larger than its window, so no size-specific shortcut is taken."""
    c = model.config
    return c.patch_size * 2 ** (len(c.depths) - 1) * (c.window_size + 1)


def default_sizes(model: SwinTransformer) -> list[tuple[int, int]]:
    """Verification sizes around the model's own s: s, 8s/7, 25s/28 x 39s/28, 12s/7 (224: 224, 256, 200x312, 384)."""
    s = model.config.img_hw[0]
    return [(s, s), (s * 8 // 7, s * 8 // 7), (s * 25 // 28, s * 39 // 28), (s * 12 // 7, s * 12 // 7)]


def _dynamic_shapes(model: SwinTransformer) -> dict:
    from torch.export import Dim

    low = min_side(model)
    return {
        "x": {
            0: Dim("batch", min=1, max=4096),
            2: Dim("height", min=low, max=MAX_SIDE),
            3: Dim("width", min=low, max=MAX_SIDE),
        }
    }


def _prepared(model: SwinTransformer, attention: str) -> SwinTransformer:
    """A CPU copy in eval mode with the chosen attention: the caller's model is left as it was."""
    if attention not in ATTENTION:
        raise ExportError(f"attention must be one of {ATTENTION}, got {attention!r}")
    model = copy.deepcopy(model).float().cpu().eval()
    model.set_fused_attn(attention == "fused")
    return model


def _example(model: SwinTransformer) -> torch.Tensor:
    side = example_side(model)
    return torch.randn(2, model.config.in_chans, side, side)


def _check_sizes(model: SwinTransformer, sizes) -> list[tuple[int, int]]:
    low = min_side(model)
    sizes = [(s, s) if isinstance(s, int) else tuple(s) for s in sizes]
    for h, w in sizes:
        if not (low <= h <= MAX_SIDE and low <= w <= MAX_SIDE):
            raise ExportError(
                f"verification size {h}x{w} is outside what the export accepts: "
                f"height and width from {low} to {MAX_SIDE}"
            )
    return sizes


def metadata(model: SwinTransformer, extra: dict | None = None) -> dict[str, str]:
    """What a deployment needs beside the graph: config, class names, preprocessing, size range."""
    info = {
        "config": model.config.to_dict(),
        "min_side": min_side(model),
        "max_side": MAX_SIDE,
        "class_names": getattr(model, "class_names", None),
    }
    info.update(extra or {})
    return {METADATA_KEY: json.dumps(info)}


def export_onnx(
    model: SwinTransformer,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    attention: str = "fused",
    sizes=None,
    batches=(1, 5),
    extra_metadata: dict | None = None,
) -> ExportReport:
    """Write `model` as ONNX with dynamic batch, height and width, then check it in onnxruntime.

    `attention`: "fused" exports scaled_dot_product_attention (opset >= 23: the ONNX Attention
    operator), "exact" the explicit softmax(q k^T + bias) v. `sizes` (default `default_sizes`)
    x `batches` are run through onnxruntime and compared with the model (max |diff| <= 1e-4).
    """
    if opset < 18:
        raise ExportError(f"opset {opset} is not supported: torch.onnx's exporter writes opset 18 or later")
    path = Path(path)
    model = _prepared(model, attention)
    sizes = _check_sizes(model, sizes or default_sizes(model))
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (_example(model),),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(model),
            opset_version=opset,
            input_names=["x"],
            output_names=["logits"],
            external_data=False,
            verbose=False,
        )
    program.model.metadata_props.update(metadata(model, extra_metadata))
    report = ExportReport(path, "onnx", time.perf_counter() - start, min_side(model))

    def write(tmp: str) -> None:  # verified before it replaces `path`: a failed check leaves no file
        program.save(tmp)
        session = onnx_session(tmp)
        report.checks = _verify(
            model, lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), sizes, batches
        )

    atomic_write(path, write)
    return report


def export_program(
    model: SwinTransformer,
    path: str | os.PathLike,
    *,
    attention: str = "fused",
    sizes=None,
    batches=(1, 5),
    extra_metadata: dict | None = None,
) -> ExportReport:
    """Write a torch.export program (.pt2) with dynamic batch, height and width, load it back and check it."""
    path = Path(path)
    model = _prepared(model, attention)
    sizes = _check_sizes(model, sizes or default_sizes(model))
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(model, (_example(model),), dynamic_shapes=_dynamic_shapes(model))
    files = metadata(model, extra_metadata)
    report = ExportReport(path, "torch-export", time.perf_counter() - start, min_side(model))

    def write(tmp: str) -> None:  # verified before it replaces `path`: a failed check leaves no file
        with open(tmp, "wb") as f:  # a file object: torch.export.save warns about a name not ending in .pt2
            torch.export.save(program, f, extra_files=files)
        report.checks = _verify(model, load_program(tmp).module(), sizes, batches)

    atomic_write(path, write)
    return report


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    with open(path, "rb") as f:
        return torch.export.load(f)


def read_program_metadata(path: str | os.PathLike) -> dict:
    """The swinx metadata of a .pt2 from `export_program` (config, class names, preprocessing), or {}.

    Read straight from the archive (a zip; extra files under `<archive>/extra/`): going through
    torch.export.load would deserialise the whole program, 44 s for swin_t.
    """
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_KEY}")]
        return json.loads(archive.read(names[0])) if names else {}


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session; threads default to torch's intra-op count (set e.g. by OMP_NUM_THREADS)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("onnxruntime is not installed: pip install 'swinx[onnx]'") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise ExportError(f"onnxruntime cannot load {path}: {e}") from e


def read_onnx_metadata(session) -> dict:
    """The swinx metadata of an ONNX session (config, class names, preprocessing), or {}."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _verify(model: SwinTransformer, run, sizes, batches) -> list[Check]:
    generator = torch.Generator().manual_seed(0)
    checks = []
    for h, w in sizes:
        for batch in batches:
            x = torch.randn(batch, model.config.in_chans, h, w, generator=generator)
            with torch.no_grad():
                expected = model(x)
                start = time.perf_counter()
                got = run(x)
                seconds = time.perf_counter() - start
            diff = (got - expected).abs().max().item()
            checks.append(Check(batch, h, w, diff, seconds))
            if not diff <= TOLERANCE:
                raise ExportError(
                    f"the export does not reproduce the model: batch {batch} at {h}x{w} "
                    f"differs by {diff:.2e} (> {TOLERANCE})"
                )
    return checks
