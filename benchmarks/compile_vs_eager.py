"""torch.compile against our eager path, swin_t float32, in one process.

    python benchmarks/compile_vs_eager.py [--freezing]              # inference, batch 8
    python benchmarks/compile_vs_eager.py --mode train [--batch 16] # training step

--freezing compiles inference with `torch._inductor.config.freezing = True` (weights as graph
constants, which lets inductor keep oneDNN's prepacked GEMMs). A training step is forward,
backward and AdamW on two copies of the same weights, one run eagerly and one through
`torch.compile(model)` (the optimizer step itself stays eager in both). Prints the compile
time, the largest difference from eager (logits, or the loss and every gradient after one
step), and the median of 7 interleaved rounds of each, and appends the row to
benchmarks/results/compile_vs_eager.csv (--out).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swinx import create_model
from swinx.engine.memory import keep_freed_memory
from swinx.tools.bench import append_csv
from swinx.tools.host import host_line, host_slug

RESULTS = Path(__file__).resolve().parent / "results" / "compile_vs_eager.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--freezing", action="store_true", help="inference only")
    parser.add_argument("--model", default="swin_t")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 for inference, 16 for training")
    parser.add_argument("--out", default=str(RESULTS), help="CSV to append the row to ('' for none)")
    args = parser.parse_args()
    if args.freezing and args.mode == "train":
        parser.error("--freezing folds the weights into the graph: inference only")
    if args.freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    batch = args.batch or (8 if args.mode == "infer" else 16)
    keep_freed_memory()  # as the swinx command does
    print(host_line())
    torch.manual_seed(0)
    model = create_model(args.model, drop_path_rate=0.0)
    x = torch.randn(batch, 3, *model.config.img_hw)
    if args.mode == "infer":
        fns, found = inference(model.eval(), x)
    else:
        fns, found = training(model, x, torch.randint(0, model.num_classes, (batch,)))
    rounds = {"eager": [], "compiled": []}
    for _ in range(2):
        for fn in fns.values():
            fn()
    for _ in range(7):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            rounds[name].append(time.perf_counter() - start)
    eager, comp = (statistics.median(rounds[k]) for k in ("eager", "compiled"))
    label = "freezing" if args.freezing else "default"
    print(
        f"{args.mode}, batch {batch}, {label}: eager {eager * 1e3:.1f} ms, compiled {comp * 1e3:.1f} ms: "
        f"compiled runs at {eager / comp:.2f}x our eager speed"
    )
    if args.out:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        row = dict(model=args.model, mode=args.mode, batch=batch, inductor=label, **found)
        row.update(eager_ms=round(eager * 1e3, 1), compiled_ms=round(comp * 1e3, 1), speedup=round(eager / comp, 3))
        row.update(rounds=7, revision=revision.strip(), date=time.strftime("%Y-%m-%d %H:%M"))
        append_csv(args.out, [dict(row, torch=torch.__version__, host=host_line(), host_slug=host_slug())])
        print(f"appended to {args.out}")


def inference(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    """The two forwards to time, and what the first compiled call found (compile time, difference)."""
    compiled = torch.compile(model)

    def run(net):
        def forward():
            with torch.inference_mode():
                return net(x)

        return forward

    reference = run(model)()
    start = time.perf_counter()
    out = run(compiled)()
    seconds, diff = time.perf_counter() - start, (out - reference).abs().max()
    print(f"compiled in {seconds:.0f} s; max |compiled - eager| {diff:.1e}")
    found = dict(compile_seconds=round(seconds), max_abs_diff=f"{diff:.1e}")
    return {"eager": run(model), "compiled": run(compiled)}, found


def training(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[dict, dict]:
    """The two training steps to time, and what the first compiled step found (compile time, differences)."""
    model.train()
    twin = copy.deepcopy(model)
    nets = {"eager": model, "compiled": torch.compile(twin)}
    optimizers = {
        name: torch.optim.AdamW(m.parameters(), lr=1e-6, foreach=True)
        for name, m in (("eager", model), ("compiled", twin))
    }

    def step_of(name):
        net, optimizer = nets[name], optimizers[name]

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), labels)
            loss.backward()
            optimizer.step()
            return loss

        return step

    # The first step of each, compared before any update: loss and every gradient.
    def first_backward(name):
        loss = F.cross_entropy(nets[name](x), labels)
        loss.backward()
        return loss

    losses = {"eager": first_backward("eager")}
    start = time.perf_counter()
    losses["compiled"] = first_backward("compiled")  # compiles the forward and the backward graphs
    seconds = time.perf_counter() - start
    grad_diff = max(
        (a.grad - b.grad).abs().max().item() for a, b in zip(model.parameters(), twin.parameters(), strict=True)
    )
    loss_diff = (losses["compiled"] - losses["eager"]).abs().item()
    print(f"compiled in {seconds:.0f} s; max |compiled - eager|: loss {loss_diff:.1e}, gradients {grad_diff:.1e}")
    found = dict(compile_seconds=round(seconds), max_abs_diff=f"loss {loss_diff:.1e}, grad {grad_diff:.1e}")
    return {name: step_of(name) for name in ("eager", "compiled")}, found


if __name__ == "__main__":
    main()
