"""Sampling while a fine-tune trains: the app's torch threads beside a niced one-thread trainer.

    python -m benchmarks.finetune_threads            # prints seconds per call; run on an otherwise idle machine

4 images × 20 steps with maps (the app's call), medians of 3, at 2 and at 1 torch threads, with the machine
free and beside `nice -n 10` one-thread matmul loop started from this process (the same session, as the
Fine-tune tab starts train.py). It is why app.TorchThreads gives the torch thread every core less the
fine-tune's while one runs.
"""

import statistics
import subprocess
import sys
import time

import torch

from diffusion.pipeline import TextToImagePipeline

BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a"


def main() -> dict:
    pipe = TextToImagePipeline.from_pretrained("weights/default")

    def call():
        result = pipe("a red circle above a blue square", num_images=4, steps=20, seed=0, record_attention=True)
        for i in range(4):
            result.attention.word_maps(i)

    seconds = {}
    for busy in (False, True):
        trainer = subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", BUSY]) if busy else None
        try:
            for threads in (2, 1):
                torch.set_num_threads(threads)
                call()
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
                seconds[f"{'beside a trainer' if busy else 'free'}, {threads} threads"] = statistics.median(times)
        finally:
            if trainer is not None:
                trainer.kill()
    for name, s in seconds.items():
        print(f"{name}: {s:.2f} s")
    return seconds


if __name__ == "__main__":
    main()
