"""Describe a U-Net preset and run it once with attention recording on.

    python -m unet                  # the CPU default
    python -m unet --preset gpu --height 64 --width 96

Prints every attention layer with its resolution, heads and parameters, the time of one guided
denoising step of one image (its two texts in one batch of 2, as the pipeline samples, on the CPU fast
path of unet/fast.py; median of 5), and what the recorder captured. A quick look inside before the app runs.
"""

import argparse
import time

import torch

from unet import PRESETS, AttentionStore, UNet, UNetConfig
from unet.fast import optimize_for_inference


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--height", type=int, default=None, help="default: the preset's sample_size")
    parser.add_argument("--width", type=int, default=None, help="default: the preset's sample_size")
    parser.add_argument("--tokens", type=int, default=8, help="text tokens in the (random) context")
    args = parser.parse_args(argv)

    config = UNetConfig.preset(args.preset)
    H, W = args.height or config.sample_size, args.width or config.sample_size
    torch.manual_seed(0)
    unet = UNet(config).eval()
    print(f"U-Net preset {args.preset!r}: {unet.num_parameters() / 1e6:.2f} M parameters")
    print(f"  {config}")
    x = torch.randn(1, config.in_channels, H, W).repeat(2, 1, 1, 1)  # one image under two texts
    context = torch.randn(2, args.tokens, config.context_dim)  # the unconditional and the prompt's text
    t = torch.tensor([500, 500])
    store = AttentionStore(num_steps=1, rows=slice(1, 2), context_layers=True)  # the conditional half
    fast = optimize_for_inference(unet) if x.device.type == "cpu" else unet
    with torch.inference_mode():
        times = []
        for _ in range(6):  # the first is a warm-up (and computes the text side)
            t0 = time.perf_counter()
            fast(x, t, context)
            times.append(time.perf_counter() - t0)
        step_ms = sorted(times[1:])[2] * 1e3
        with fast.record_attention(store):
            store.set_step(0)
            fast(x, t, context)

    print(f"\n{'attention layer':<22} {'kind':<7} {'H×W':>7} {'heads':>5} {'params':>8}   recorded map")
    for name, block in unet.attention_layers.items():
        params = sum(p.numel() for p in block.parameters())
        info = store.layers.get(name)
        size = f"{info.size[0]}×{info.size[1]}" if info else "-"
        shape = tuple(store.mean(name).shape) if info else "not recorded (too many positions)"
        print(f"{name:<22} {block.kind:<7} {size:>7} {block.num_heads:>5} {params:>8,}   {shape}")
    print(f"\none guided step of one image at {H}×{W}: {step_ms:.1f} ms on {torch.get_num_threads()} threads; "
          f"recorder holds {store.nbytes() / 2**10:.0f} KiB")


if __name__ == "__main__":
    main()
