"""bfloat16 autocast against float32: how far the logits move, and whether the top-1 class changes.

Two models: the shipped 32x32 digit classifier (tests/fixtures/serve/digits32.safetensors, trained
by the small-data preset) on the 1,000 held-out colour digits of make_digit_folder.py (100 per
class), and swin_t at 224 with random weights on 64 random images (logits only).

    python benchmarks/bf16_agreement.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from make_digit_folder import write_split
from PIL import Image

from swinx import create_model
from swinx.classification.data import mnist5k
from swinx.classification.inference import load_for_inference, transform_for
from swinx.tools.host import host_line

ROOT = Path(__file__).resolve().parents[1]


def logits(model, x: torch.Tensor, bf16: bool, batch: int = 100) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return torch.cat([model(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def compare(name: str, model, x: torch.Tensor, labels: torch.Tensor | None) -> None:
    full, half = logits(model, x, False), logits(model, x, True)
    diff = (half - full).abs()
    agree = (half.argmax(1) == full.argmax(1)).float().mean().item()
    line = f"{name}: max |bf16 - fp32| {diff.max():.3g}, mean {diff.mean():.3g}, top-1 agreement {100 * agree:.1f}%"
    if labels is not None:
        acc = [(out.argmax(1) == labels).float().mean().item() * 100 for out in (full, half)]
        line += f", top-1 {acc[0]:.1f}% (fp32) / {acc[1]:.1f}% (bf16) of {len(labels)}"
    print(line)


def main() -> None:
    print(host_line())
    loaded = load_for_inference(ROOT / "tests/fixtures/serve/digits32.safetensors")
    _, val, _ = mnist5k()
    with tempfile.TemporaryDirectory() as tmp:
        write_split(val.images, val.labels, 100, Path(tmp), 32, seed=1)
        transform = transform_for(loaded)
        files = sorted(Path(tmp).glob("*/*.png"))
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        labels = torch.tensor([loaded.class_names.index(f.parent.name) for f in files])
    compare("digits32 on 1,000 held-out digits", loaded.model.eval(), x, labels)
    torch.manual_seed(0)
    model = create_model("swin_t", drop_path_rate=0.0).eval()
    compare("swin_t 224, random weights, 64 random images", model, torch.randn(64, 3, 224, 224), None)


if __name__ == "__main__":
    main()
