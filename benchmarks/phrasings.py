"""Relation phrasings on a shapes model: does "A at the top and B at the bottom" hold as often as "A above B"?

    python -m benchmarks.phrasings                         # weights/default: 4 pairs × 4 seeds a phrasing
    python -m benchmarks.phrasings --pairs 8 --seeds 8     # more images a phrasing

Samples as the app does (20 DPM++ steps, guidance 4, the app's relation and object guidance) and scores
each image with the shapes detector (data/detector.py) by evaluate.py's GenEval rule: both named objects
drawn and nothing else, and the relation holding by half a cell. Every phrasing of a pair starts from the
same noise (seeds 0 … n − 1), so the phrasings are compared image for image. Prints a Markdown table:
images where the relation held, where its opposite held, and where the pair was drawn in one row or
column ("neither") or not drawn as named.

Measured on weights/default (fp32, 2 shared CPU cores), 4 pairs × 4 seeds = 16 images a phrasing; "before"
is the same script on the code before diffusion/relations.py (b48a6af), which read only "above", "below",
"(to the) left/right of", so the other phrasings got the object term instead of the relation term:

| phrasing                          | held, before | held, now | inverted, before → now |
|-----------------------------------|--------------|-----------|------------------------|
| A above B                         | 14/16        | 14/16     | 0 → 0                  |
| A at the top and B at the bottom  | 11/16        | 15/16     | 3 → 0                  |
| A over B                          | 4/16         | 16/16     | 10 → 0                 |
| A to the left of B                | 15/16        | 15/16     | 0 → 0                  |
| A on the left and B on the right  | 13/16        | 13/16     | 0 → 0                  |

(The misses left are pairs not drawn as named. The model follows "on the left"/"on the right" on its own: its
position words were grounded in training; "at the top … at the bottom" it followed less well without guidance.)
"""

import argparse
import time

from data.detector import detect
from diffusion.layout import OBJECT_GUIDANCE, RELATION_GUIDANCE
from diffusion.pipeline import TextToImagePipeline
from evaluate import Prompt, article, correct, relation_direction

# (template, the relation of A to B it says)
PHRASINGS = [
    ("{a} above {b}", "above"),
    ("{a} at the top and {b} at the bottom", "above"),
    ("{a} over {b}", "above"),
    ("{a} to the left of {b}", "left of"),
    ("{a} on the left and {b} on the right", "left of"),
]
# Colour–shape pairs training saw (none of data.shapes' held-out pairs or relations); the first is the issue's.
PAIRS = [(("purple", "circle"), ("green", "square")), (("red", "triangle"), ("blue", "square")),
         (("orange", "diamond"), ("yellow", "circle")), (("blue", "cross"), ("red", "square")),
         (("green", "circle"), ("orange", "cross")), (("yellow", "triangle"), ("purple", "square")),
         (("red", "diamond"), ("blue", "triangle")), (("orange", "square"), ("green", "diamond"))]


def relation_prompt(template: str, relation: str, a: tuple[str, str], b: tuple[str, str]) -> Prompt:
    text = template.format(a=article(" ".join(a)), b=article(" ".join(b)))
    return Prompt("position", text, [a, b], [a, b], relation=(0, relation, 1))


def measure(pipe: TextToImagePipeline, pairs: int, seeds: int) -> dict[str, dict[str, int]]:
    """Per phrasing: images where the relation held, was inverted, neither, or the pair was not drawn; and
    how many calls relation guidance nudged."""
    size = pipe.unet.config.sample_size
    out = {}
    for template, relation in PHRASINGS:
        counts = {"held": 0, "inverted": 0, "neither": 0, "not drawn": 0, "guided calls": 0, "images": 0}
        for a, b in PAIRS[:pairs]:
            prompt = relation_prompt(template, relation, a, b)
            result = pipe(prompt.text, num_images=seeds, steps=20, guidance_scale=4.0, sampler="dpm++", seed=0,
                          relation_guidance=RELATION_GUIDANCE, object_guidance=OBJECT_GUIDANCE)
            counts["guided calls"] += result.relation_guided
            for image in result.images:
                dets = detect(image)
                direction = relation_direction(prompt, dets, size)
                counts["held" if correct(prompt, dets, size) else direction or "not drawn"] += 1
                counts["images"] += 1
        out[template] = counts
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="weights/default", help="a shapes model's pipeline folder")
    parser.add_argument("--pairs", type=int, default=4, choices=range(1, len(PAIRS) + 1), metavar=f"1..{len(PAIRS)}")
    parser.add_argument("--seeds", type=int, default=4, help="images per pair and phrasing (seeds 0 … n − 1)")
    parser.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args(argv)
    pipe = TextToImagePipeline.from_pretrained(args.model, dtype=args.dtype)
    start = time.perf_counter()
    results = measure(pipe, args.pairs, args.seeds)
    print(f"{args.model}, {args.pairs} pairs × {args.seeds} seeds, {args.dtype}, "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| phrasing | relation held | inverted | neither | not drawn as named | calls guided |")
    print("|---|---|---|---|---|---|")
    for template, c in results.items():
        print(f"| {template.format(a='A', b='B')} | {c['held']}/{c['images']} | {c['inverted']} | {c['neither']} "
              f"| {c['not drawn']} | {c['guided calls']}/{args.pairs} |")


if __name__ == "__main__":
    main()
