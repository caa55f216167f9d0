"""Training images/s and sampling latency on each device this machine has, through the code users run.

    python -m benchmarks.devices                 # the CPU, and the GPU when torch sees one; writes "devices"
    python -m benchmarks.devices --device cuda   # one device only; writes its own section, "devices-cuda"
    python -m benchmarks.devices --quick         # fewer steps and repeats; prints only

Training is `python train.py` itself, run as a user runs it (a fresh process), fine-tuning --model with the
shipped model's last-stage recipe (grounding loss with position and relation words, bf16 where the device
runs it fast), so data loading, text encoding, the recorder, the optimizer and EMA are all in the number;
images/s is train.py's own per-step figure as it writes it to OUT/metrics.jsonl, the median after the
warm-up steps, and the precision and hardware are those its last checkpoint's state.json records. The final
checkpoint, validation grid and export that every run ends with are not timed. Sampling is TextToImagePipeline
on the device in the dtype it picks there: 4 images, 20 steps, guidance 4, maps off and on, as in
benchmarks.endtoend.
On a GPU, a larger training batch is measured too: a GPU is not busy at the CPU recipe's 64.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import write_section
from benchmarks.endtoend import end_to_end
from diffusion.pipeline import TextToImagePipeline

ROOT = Path(__file__).resolve().parent.parent


def training_rate(device: str, model: str, data: str, batch_size: int, steps: int, warmup: int,
                  **overrides) -> tuple[float, str, str]:
    """(median images/s of train.py's steps after `warmup`, the mixed precision it ran in, its hardware).

    `overrides` are further train.py flags by TrainConfig field name (the tests' tiny models train at 16 px,
    in fp32: resolution=16, mixed_precision="no")."""
    settings = dict(init=model, data=data, caption_column="captions", steps=warmup + steps, batch_size=batch_size,
                    lr=1e-5, warmup=1, checkpoint_every=10**9, validate_every=10**9, validation_steps=2,
                    validation_prompts="a red circle", grounding_weight=0.05, **overrides)
    flags = [a for name, value in settings.items() for a in ("--" + name.replace("_", "-"), str(value))]
    flags += ["--ground-positions", "--ground-relations"] + (["--cpu"] if device == "cpu" else [])
    with tempfile.TemporaryDirectory() as out:
        run = subprocess.run([sys.executable, "train.py", *flags, "--out", out], cwd=ROOT, capture_output=True,
                             text=True)
        if run.returncode != 0:
            raise RuntimeError(f"train.py failed (exit {run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-3000:]}")
        rates = [json.loads(line)["images_per_s"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        last = sorted((Path(out) / "checkpoints").glob("step_*"))[-1]
        state = json.loads((last / "state.json").read_text())
    return statistics.median(rates[warmup:]), state["precision"], state["hardware"]
def sampling_latency(device: str, model: str, repeats: int) -> tuple[dict[str, float], torch.dtype]:
    pipe = TextToImagePipeline.from_pretrained(model, device=device)
    return end_to_end(pipe, repeats), pipe.dtype


def devices_present() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
            rate, precision, hardware = training_rate(device, args.model, args.data, batch, n, w)
            precision = {"no": "fp32"}.get(precision, precision)  # accelerate's name for none
            lines.append(f"| {hardware} | {batch} | {precision} | **{rate:.0f}** | {latency['off']:.2f} s "
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
                "Training: `python train.py` fine-tuning the shipped model with its last stage's recipe (grounding "
                "with position and relation words), images/s as train.py logs it, median of the steps after the "
                "warm-up. Sampling: 4 images, 20 DPM++ steps, guidance 4, median seconds per call.\n\n" + table)
        command = "python -m benchmarks.devices " + " ".join(sys.argv[1:] if argv is None else argv)
        # One device's rows get their own section, so a GPU run adds to the CPU's table instead of replacing it.
        write_section("devices" if args.device == "all" else f"devices-{args.device}", body, command.strip())
    return table


if __name__ == "__main__":
    main()
