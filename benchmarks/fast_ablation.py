"""What each trick of unet/fast.py is worth: a guided bf16 step of the optimized shipped U-Net with one trick
taken out at a time (its twin class reverted to the plain one), CPU time on one thread, interleaved.

    python -m benchmarks.fast_ablation    # prints a table; the numbers quoted in unet/fast.py's docstring
"""

import statistics
import time

import torch
import torch.nn as nn

from unet import UNet, blocks
from unet import fast as fp

KINDS = ["all", "no packed conv", "no position cache", "no text cache", "no stacked films",
         "no fast residual block (FiLM in norm, in-place SiLU, stacked)", "no guided sharing"]


def revert(model: nn.Module, twin: type, plain: type) -> None:
    for module in model.modules():
        if type(module) is twin:
            module.__class__ = plain


def variant(base: UNet, kind: str) -> UNet:
    fast = fp.optimize_for_inference(base)
    if kind == "no packed conv":
        revert(fast, fp.PackedConv2d, nn.Conv2d)
    elif kind == "no position cache":
        revert(fast, fp.FastPositionEmbedding, blocks.PositionEmbedding)
    elif kind == "no text cache":
        revert(fast, fp.CachedContextRefiner, blocks.ContextRefiner)
        revert(fast, fp.CachedTextLinear, nn.Linear)
    elif kind == "no stacked films":
        for module in fast.modules():
            if isinstance(module, fp.FastResidualBlock):
                module._time_mlps = None
    elif kind.startswith("no fast residual block"):
        revert(fast, fp.FastResidualBlock, blocks.ResidualBlock)
    return fast


def main(rounds: int = 12, warmup: int = 2) -> None:
    torch.set_num_threads(1)
    base = UNet.from_pretrained("weights/default/unet").eval().to(torch.bfloat16)
    x, context = torch.randn(4, 3, 32, 32).bfloat16(), torch.randn(8, 12, 256).bfloat16()
    t = torch.full((8,), 500)
    models = {kind: variant(base, kind) for kind in KINDS}
    inputs = {kind: torch.cat([x, x]) for kind in KINDS}
    inputs["no guided sharing"] = torch.cat([x, x.roll(1, 0)])  # not a guided pair: every layer at batch 8
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with torch.inference_mode():
        for r in range(rounds):
            for kind in KINDS:
                t0 = time.process_time()
                models[kind](inputs[kind], t, context)
                if r >= warmup:
                    times[kind].append(time.process_time() - t0)
    reference = statistics.median(times["all"])
    print("| variant | ms per guided step (CPU time, 1 thread) | ÷ all tricks |\n|---|---|---|")
    for kind in KINDS:
        median = statistics.median(times[kind])
        print(f"| {kind} | {median * 1e3:.1f} | {median / reference:.3f} |")


if __name__ == "__main__":
    main()
