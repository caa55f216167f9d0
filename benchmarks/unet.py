"""Our U-Net vs diffusers' UNet2DConditionModel with the same widths, levels and attention placement.

    python -m benchmarks.unet            # writes the "unet" section of BENCHMARKS.md
    python -m benchmarks.unet --quick    # fewer repeats, prints only

Both: 32 px, 32/64/128 channels, 2 residual blocks per level, attention at 16×16 and 8×8, 4 heads,
context width 256, 12 text tokens. diffusers' transformer blocks also carry a feed-forward layer and
layer norms, so it has more parameters; the comparison is what a user of each gets for these sizes.
Measured: ms per guided denoising step of 4 images (batch 8) in fp32, bf16 autocast and with bf16
weights (the pipeline's inference path on a CPU with fast bf16), and training
images/s (batch 32, forward + backward + AdamW) in fp32 and bf16 autocast. Target (issue 8): our step
≤ 0.6× the peer's time.

A third sampling column runs our U-Net with every attention block skipped (each returns its input):
the time of the convolutions, norms and activations both networks share. Its ratio to the peer is the
floor that no attention speed-up can go below. The fixed-cost columns time the same step for one image
(batch 2) on an 8×8 input, where the arithmetic is next to nothing: the cost of each network's ops by
their number.
"""

import argparse
import copy
import sys

import torch
from diffusers import UNet2DConditionModel

from benchmarks.common import as_sampled, interleaved_medians, write_section
from unet import UNet, UNetConfig

FLOOR = "ours without attention"


def models():
    torch.manual_seed(0)
    ours = UNet(UNetConfig.preset("cpu"))
    c = ours.config
    peer = UNet2DConditionModel(
        sample_size=c.sample_size, in_channels=3, out_channels=3,
        block_out_channels=tuple(c.base_channels * m for m in c.channel_mults), layers_per_block=c.num_res_blocks,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=c.context_dim,
        attention_head_dim=c.num_heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=c.norm_groups,
    )
    with torch.no_grad():  # non-zero weights everywhere, so no kernel takes a shortcut on zeros
        for m in (ours, peer):
            for p in m.parameters():
                p.normal_(0, 0.02)
    return {"ours": ours, "diffusers": peer}


def without_attention(unet: UNet) -> UNet:
    """A copy of `unet` whose attention blocks all return their input unchanged."""
    copied = copy.deepcopy(unet)
    for block in copied.attention_layers.values():
        block.forward = lambda x, *args, **kwargs: x
    return copied


def call(model, x, t, ctx):
    return model(x, t, ctx) if isinstance(model, UNet) else model(x, t, ctx).sample


def guided_call(model, x, t, ctx):
    """One guided step of x's images under the 2 texts per image in ctx: both on the doubled batch, as the
    pipelines (ours: diffusion/sampling.py, diffusers') call them."""
    return call(model, torch.cat([x, x]), torch.cat([t, t]), ctx)


def sampling_ms(nets: dict, dtype: torch.dtype | None, repeats: int, cast: bool = False, batch: int = 8,
                size: int = 32) -> dict[str, float]:
    """ms per guided step of batch // 2 images at size × size; dtype=None: fp32; cast=False: autocast to dtype;
    cast=True: weights cast to dtype (what TextToImagePipeline does for inference)."""
    x, t, ctx = torch.randn(batch // 2, 3, size, size), torch.full((batch // 2,), 500), torch.randn(batch, 12, 256)
    if cast:
        nets = {k: copy.deepcopy(m).to(dtype) for k, m in nets.items()}
        x, ctx = x.to(dtype), ctx.to(dtype)
    nets = {k: as_sampled(m.eval()) for k, m in nets.items()}

    def step(name):
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None and not cast):
            return guided_call(nets[name], x, t, ctx)

    fns = {name: (lambda n=name: step(n)) for name in nets}
    return {k: v * 1e3 for k, v in interleaved_medians(fns, repeats=repeats).items()}


def training_images_per_s(nets: dict, dtype: torch.dtype | None, repeats: int, batch: int = 32) -> dict[str, float]:
    x, t, ctx = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,)), torch.randn(batch, 12, 256)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in nets.items()}

    def step(name):
        model = nets[name].train()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = call(model, x, t, ctx).float().square().mean()
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    fns = {name: (lambda n=name: step(n)) for name in nets}
    return {k: batch / v for k, v in interleaved_medians(fns, repeats=repeats, warmup=1).items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats; print, do not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 15
    nets = models()
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in nets.items()}
    rows = []
    timed = {**nets, FLOOR: without_attention(nets["ours"])}  # sampling only: the floor has no attention to train
    for label, dtype, cast in (("fp32", None, False), ("bf16 autocast", torch.bfloat16, False),
                               ("bf16 weights (inference)", torch.bfloat16, True)):
        ms = sampling_ms(timed, dtype, repeats, cast)
        fixed = sampling_ms(nets, dtype, repeats, cast, batch=2, size=8)
        ips = None if cast else training_images_per_s(nets, dtype, max(3, repeats // 3))
        rows.append((label, ms, fixed, ips))
        print(label, ms, fixed, ips, flush=True)
    lines = ["| precision | ours ms/step | diffusers ms/step | ours ÷ diffusers (time) | ours without attention "
             "ms/step | floor ÷ diffusers | fixed cost: ours ms | fixed cost: diffusers ms | ours train img/s "
             "| diffusers train img/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, ms, fixed, ips in rows:
        train_cells = f"{ips['ours']:.1f} | {ips['diffusers']:.1f}" if ips else "– | –"
        lines.append(f"| {label} | {ms['ours']:.1f} | {ms['diffusers']:.1f} | **{ms['ours'] / ms['diffusers']:.2f}** "
                     f"| {ms[FLOOR]:.1f} | {ms[FLOOR] / ms['diffusers']:.2f} | {fixed['ours']:.1f} "
                     f"| {fixed['diffusers']:.1f} | {train_cells} |")
    table = "\n".join(lines)
    print(table)
    if args.quick:
        return
    body = (
        "## U-Net vs diffusers UNet2DConditionModel\n\n"
        f"Same widths (32/64/128), levels, attention at 16×16 and 8×8, 4 heads. Parameters: ours "
        f"{params['ours']:.2f} M, diffusers {params['diffusers']:.2f} M (its transformer blocks add a "
        "feed-forward layer). Sampling: one guided step of 4 images (batch 8) under inference_mode; ours "
        "as the pipeline runs it, through `optimize_for_inference` (unet/fast.py: channels-last with packed "
        "convolution weights on a CPU, the text's keys and values computed once per sampling run); both on the "
        "doubled batch, as the pipelines call them. "
        "Training: batch 32, forward + backward + AdamW. Target: ours ≤ 0.6× the peer's step time. \"Without "
        "attention\": our U-Net with every attention block skipped, the work both networks share; its ratio "
        "to the peer is the floor for ours. \"Fixed cost\": the same step for one image (batch 2) on an 8×8 input, "
        "where there is next to nothing to compute: what each network's ops cost by their number, not their "
        "arithmetic (dispatch, oneDNN and Python overhead), a part of every step that no kernel speed-up "
        "shrinks.\n\n" + table
    )
    command = "python -m benchmarks.unet " + " ".join(sys.argv[1:] if argv is None else argv)
    write_section("unet", body, command.strip())


if __name__ == "__main__":
    main()
