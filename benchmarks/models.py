"""What a visitor waits for on each shipped model: 4 images × 20 steps with maps, as the app serves them.

    python -m benchmarks.models            # every model in weights/; writes the "models" section of BENCHMARKS.md
    python -m benchmarks.models --quick    # fewer repeats, prints only

Per model (a folder of weights/ with a unet/): its sample size and parameter count, and the median seconds of
one app call (4 images, 20 DPM++ steps, guidance 4, maps recorded and every image's word maps made, the app's
dtype) on all of this machine's cores and on one, the models interleaved so noise hits them alike. The prompt is
each model's own first example (diffusion/vocabulary.py), as a visitor's first click would be. Target (issue 34):
≤ ~2 s on 2 cores for a 64 px model.
"""

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.common import interleaved_medians, write_section
from diffusion.pipeline import TextToImagePipeline, model_folders
from diffusion.vocabulary import example_prompts

ROOT = Path(__file__).resolve().parent.parent


def app_call(pipe: TextToImagePipeline, prompt: str):
    """One call as the app makes it: 4 images, 20 steps, maps on, then every image's word maps."""

    def run():
        result = pipe(prompt, num_images=4, steps=20, guidance_scale=4.0, seed=0, record_attention=True,
                      self_attention_per_bin=1)
        for i in range(4):
            result.attention.word_maps(i)

    return run


def measure(folders: list[Path], repeats: int) -> list[dict]:
    pipes = {f.name: TextToImagePipeline.from_pretrained(f) for f in folders}
    prompts = {name: (example_prompts(pipe.captions, pipe.layout_grammar) or ["a red circle"])[0]
               for name, pipe in pipes.items()}
    rows = {name: {"model": name, "size": pipe.unet.config.sample_size, "prompt": prompts[name],
                   "params_m": sum(p.numel() for p in pipe.unet.parameters()) / 1e6, "dtype": str(pipe.dtype)}
            for name, pipe in pipes.items()}
    cores = torch.get_num_threads()
    for threads in sorted({cores, 1}, reverse=True):
        torch.set_num_threads(threads)
        times = interleaved_medians({n: app_call(p, prompts[n]) for n, p in pipes.items()}, repeats=repeats,
                                    warmup=1, budget_s=90)
        for name, seconds in times.items():
            rows[name][f"{threads} thread" + "s" * (threads > 1)] = seconds
    torch.set_num_threads(cores)
    return list(rows.values())


def table(rows: list[dict]) -> str:
    columns = [k for k in rows[0] if k.endswith(("thread", "threads"))]
    lines = ["| model | size | U-Net | dtype | first example | " + " | ".join(f"s, {c}" for c in columns) + " |",
             "|---|---|---|---|---|" + "---|" * len(columns)]
    base = rows[0]
    for r in rows:
        cells = [f"{r[c]:.2f}" + ("" if r is base else f" ({r[c] / base[c]:.2f}×)") for c in columns]
        lines.append(f"| {r['model']} | {r['size']} px | {r['params_m']:.1f} M | {r['dtype'].removeprefix('torch.')} "
                     f"| \"{r['prompt']}\" | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats; print, do not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    rows = measure(model_folders(ROOT / "weights"), repeats=3 if args.quick else 9)
    body = ("## Each shipped model, as the app serves it (`benchmarks/models.py`)\n\n"
            "One app call: 4 images × 20 DPM++ steps, guidance 4, maps recorded and every image's word maps made, "
            "median seconds of interleaved repeats; in brackets, ÷ the first model.\n\n" + table(rows))
    print(body)
    if not args.quick:
        write_section("models", body, "python -m benchmarks.models " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
