"""Training images/s and sampling latency on each device this machine has, through the code users run.

    python -m benchmarks.devices                 # the CPU, and the GPU when torch sees one; writes "devices"
    python -m benchmarks.devices --device cuda   # one device only; writes its own section, "devices-cuda"
    python -m benchmarks.devices --quick         # fewer steps and repeats; prints only

Training is `train.train()` itself, fine-tuning --model with the shipped model's last-stage recipe
(grounding loss with position and relation words, bf16 where the device runs it fast), so data loading,
text encoding, the recorder, the optimizer and EMA are all in the number; images/s is train.py's own
per-step figure (`on_step`), the median after the warm-up steps. The final checkpoint, validation
grid and export that every run ends with are not timed. Sampling is TextToImagePipeline on the device
in the dtype it picks there: 4 images, 20 steps, guidance 4, maps off and on, as in benchmarks.endtoend.
On a GPU, a larger training batch is measured too: a GPU is not busy at the CPU recipe's 64.
"""

import argparse
import statistics
import sys
import tempfile

import torch

import train
from benchmarks.common import write_section
from benchmarks.endtoend import end_to_end
from diffusion.pipeline import TextToImagePipeline


def training_rate(device: str, model: str, data: str, batch_size: int, steps: int, warmup: int,
                  **overrides) -> tuple[float, str]:
    """(median images/s of train.py's steps after `warmup`, the mixed precision it ran in).

    `overrides` are further TrainConfig fields (the tests' tiny models train at 16 px, in fp32)."""
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        cfg = train.TrainConfig(
            init=model, data=data, caption_column="captions", out=out, steps=warmup + steps, batch_size=batch_size,
            lr=1e-5, warmup=1, checkpoint_every=10**9, validate_every=10**9, validation_steps=2,
            validation_prompts=("a red circle",), grounding_weight=0.05, ground_positions=True,
            ground_relations=True, cpu=device == "cpu", **overrides)
        train.train(cfg, on_step=lambda done, logs: rates.append(logs["images_per_s"]))
    return statistics.median(rates[warmup:]), train.resolve_precision(cfg)


def sampling_latency(device: str, model: str, repeats: int) -> tuple[dict[str, float], torch.dtype]:
    pipe = TextToImagePipeline.from_pretrained(model, device=device)
    return end_to_end(pipe, repeats), pipe.dtype


def devices_present() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return train.hardware(torch.device("cpu"))


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="weights/default", help="pipeline folder (default: %(default)s)")
    parser.add_argument("--data", default="shapes:4096",
                        help="training data, as train.py's --data (default: %(default)s, generated into cache/)")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats; print, do not write")
    args = parser.parse_args(argv)
    devices = devices_present() if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU on this machine (torch.cuda.is_available() is False).")
    steps, warmup, repeats = (3, 1, 2) if args.quick else (8, 2, 5)

    lines = ["| device | training batch | precision | training images/s | 4 images × 20 steps, maps off "
             "| maps on | maps on + layout guidance | U-Net dtype |", "|---|---|---|---|---|---|---|---|"]
    for device in devices:
        batches = [64] if device == "cpu" else [64, 512]
        latency, dtype = sampling_latency(device, args.model, repeats)
        for batch in batches:
            # A GPU step is milliseconds: more steps for a stable median, still seconds in all.
            n, w = (steps, warmup) if device == "cpu" else (steps * 4, warmup * 5)
            rate, precision = training_rate(device, args.model, args.data, batch, n, w)
            precision = {"no": "fp32"}.get(precision, precision)  # accelerate's name for none
            lines.append(f"| {device_name(device)} | {batch} | {precision} | **{rate:.0f}** | {latency['off']:.2f} s "
                         f"| **{latency['on']:.2f} s** | {latency['on, layout guidance']:.2f} s "
                         f"| {str(dtype).removeprefix('torch.')} |")
            print(lines[-1], flush=True)
    if not torch.cuda.is_available():
        lines += ["", "No GPU on the machine that made this table: `python -m benchmarks.devices --device cuda` on one "
                  "adds its own section."]
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        where = "each device" if args.device == "all" else {"cpu": "the CPU", "cuda": "a GPU"}[args.device]
        body = (f"## Training and sampling on {where} (train.py and the pipeline themselves)\n\n"
                "Training: `train.train()` fine-tuning the shipped model with its last stage's recipe (grounding "
                "with position and relation words), images/s as train.py logs it, median of the steps after the "
                "warm-up. Sampling: 4 images, 20 DPM++ steps, guidance 4, median seconds per call.\n\n" + table)
        command = "python -m benchmarks.devices " + " ".join(sys.argv[1:] if argv is None else argv)
        # One device's rows get their own section, so a GPU run adds to the CPU's table instead of replacing it.
        write_section("devices" if args.device == "all" else f"devices-{args.device}", body, command.strip())
    return table


if __name__ == "__main__":
    main()
