"""torch.compile against our eager path, swin_t batch 8 float32 inference, in one process.

    python benchmarks/compile_vs_eager.py [--freezing]

--freezing compiles with `torch._inductor.config.freezing = True` (weights as graph constants,
which lets inductor keep oneDNN's prepacked GEMMs). Prints the compile time, the largest logit
difference from eager, and the median of 7 interleaved rounds of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from swinx import create_model
from swinx.tools.host import host_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--freezing", action="store_true")
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if args.freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    print(host_line())
    torch.manual_seed(0)
    model = create_model(args.model, drop_path_rate=0.0).eval()
    x = torch.randn(args.batch, 3, *model.config.img_hw)
    compiled = torch.compile(model)
    with torch.inference_mode():
        reference = model(x)
        start = time.perf_counter()
        out = compiled(x)
        seconds, diff = time.perf_counter() - start, (out - reference).abs().max()
        print(f"compiled in {seconds:.0f} s; max |compiled - eager| {diff:.1e}")
        rounds = {"eager": [], "compiled": []}
        for _ in range(2):
            model(x), compiled(x)
        for _ in range(7):
            for name, fn in (("eager", model), ("compiled", compiled)):
                start = time.perf_counter()
                fn(x)
                rounds[name].append(time.perf_counter() - start)
    eager, comp = (statistics.median(rounds[k]) for k in ("eager", "compiled"))
    print(
        f"{'freezing' if args.freezing else 'default'}: eager {eager * 1e3:.1f} ms, compiled {comp * 1e3:.1f} ms: "
        f"compiled runs at {eager / comp:.2f}x our eager speed"
    )


if __name__ == "__main__":
    main()
