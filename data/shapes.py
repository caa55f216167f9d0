"""Procedural captioned shapes: coloured shapes on plain backgrounds, with exact ground truth.

Every image is a 3x3 grid of cells; 1-3 objects each sit inside their own cell with a margin, so
objects never overlap, their masks never touch (>= 1 px gap at 32 px), and every position word and
relation in a caption is unambiguous: "in the top left" names the cell, "A above B" means A's row is
above B's row. Geometry is sampled on a 1/256 grid of the unit square, so the boxes written to
`metadata.jsonl` are exact binary floats and `object_mask` rebuilds every mask bit for bit.

Some colour-shape combinations and (shape, relation, shape) configurations are held out: they never
occur in the train or validation images (hence never in their captions); the `test` split follows the
unrestricted distribution and the `heldout` split has at least one held-out combination per image.

Output is Hugging Face `imagefolder` layout, loadable with `datasets.load_dataset(out_dir)`:

    <out>/README.md                  dataset card whose `configs:` maps the four splits to folders
    <out>/shapes_info.json           generator config, palettes, held-out lists, split sizes
    <out>/<split>/000000.png ...
    <out>/<split>/metadata.jsonl     file_name, text, captions, background, objects, held_out ("; "-joined)

Run:  python -m data.shapes --out cache/shapes32 --size 32 --n-train 50000
A mix richer in the hard tasks (more multi-object, counting and relation captions; the shipped model's
last fine-tune): add --object-count-weights 1 2 3 --same-group-prob 0.5 --relation-captions 2.
--relation-pairs all relates every pair of uniquely named objects, not one pair a scene.
Each image is drawn from its own RNG seeded by (seed, split, index): the output does not depend on the
number of workers or on the order in which chunks finish.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import multiprocessing as mp
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from diffusion.grammar import COLOURS as COLOUR_WORDS
from diffusion.grammar import CONVERSE, KINDS, NUMBER_WORDS, PLACE_WORDS, PLURALS, POSITION_WORDS, RELATIONS
from diffusion.grammar import SIZES as SIZE_WORDS

# The caption grammar's words (kinds, colours, sizes, relations, places, numbers) live in diffusion/grammar.py,
# where the grounding loss and layout guidance read them; here is what the generator draws with them.
# Hues far apart in RGB and far from every background (min distance ~150), so a nearest-palette
# rule on the object's interior pixels is exact and antialiased edges stay separable.
COLOURS = dict(zip(COLOUR_WORDS, [(220, 38, 38), (245, 135, 20), (235, 210, 35), (30, 160, 60), (40, 90, 225),
                                  (145, 55, 195)], strict=True))  # red, orange, yellow, green, blue, purple
BACKGROUNDS = {"white": (255, 255, 255), "light gray": (205, 205, 205), "dark gray": (45, 45, 45),
               "black": (0, 0, 0)}
# Sizes are box sides as fractions of the image side; one cell is 1/3.
SIZES = dict(zip(SIZE_WORDS, [(0.19, 0.21), (0.27, 0.30)], strict=True))  # small, large
SPLITS = ("train", "validation", "test", "heldout")

GRID = 256      # geometry quantum: 1/256 of the image side (1/8 px at 32 px: exact in float and JSON)
MARGIN = 4      # in GRID units from each cell edge: 0.5 px at 32 px, so neighbours are >= 1 px apart
SUPERSAMPLE = 4  # 4x4 samples per pixel for antialiased coverage


@dataclass(frozen=True)
class ShapesConfig:
    """What to draw. Saved to `shapes_info.json`; the same config and seed give the same bytes."""

    size: int = 32                        # image side in pixels
    seed: int = 0
    max_objects: int = 3
    object_count_weights: tuple[float, ...] | None = None  # relative odds of 1..max_objects objects; None: even
    same_group_prob: float = 0.3          # chance a multi-object scene repeats one kind+colour (counting)
    relation_captions: int = 1            # 2: also the converse phrasing ("B to the right of A") of the relation
    relation_pairs: str = "one"           # "all": a relation caption for every pair of uniquely named objects
    background_caption_prob: float = 0.3  # chance a phrasing also names the background
    held_out_pairs: tuple[tuple[str, str], ...] = (
        ("green", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "diamond"),
        ("red", "cross"))
    held_out_relations: tuple[tuple[str, str, str], ...] = (
        ("triangle", "above", "circle"), ("square", "left of", "diamond"))

    def __post_init__(self):
        if self.size < 24:
            raise ValueError(f"size={self.size} px is too small: small objects would be under 5 px. "
                             "Use size >= 24 (32 is the default, 64 also works).")
        weights = self.object_count_weights
        if weights is not None and (len(weights) != self.max_objects or min(weights) < 0 or not sum(weights) > 0):
            raise ValueError(f"object_count_weights={weights} must give {self.max_objects} non-negative odds "
                             f"(for 1..{self.max_objects} objects), not all zero; or None for even odds.")
        if not 0 <= self.same_group_prob <= 1:
            raise ValueError(f"same_group_prob={self.same_group_prob} must be a probability in [0, 1].")
        if self.relation_captions not in (1, 2):
            raise ValueError(f"relation_captions={self.relation_captions}: must be 1 (one relation phrasing "
                             "per scene) or 2 (that phrasing and its converse).")
        if self.relation_pairs not in ("one", "all"):
            raise ValueError(f"relation_pairs={self.relation_pairs!r}: must be 'one' (one related pair per "
                             "scene) or 'all' (every pair of uniquely named objects).")
        if not 1 <= self.max_objects <= 3:
            raise ValueError(f"max_objects={self.max_objects}: must be 1, 2 or 3 (one object per "
                             "grid cell, and captions stay short).")
        for colour, kind in self.held_out_pairs:
            if colour not in COLOURS or kind not in KINDS:
                raise ValueError(f"held-out pair ({colour!r}, {kind!r}) is not a known colour and kind; "
                                 f"colours: {list(COLOURS)}, kinds: {list(KINDS)}")
        for a, rel, b in self.held_out_relations:
            if a not in KINDS or b not in KINDS or rel not in RELATIONS:
                raise ValueError(f"held-out relation ({a!r}, {rel!r}, {b!r}) must be (kind, relation, "
                                 f"kind) with relation in {RELATIONS}")


@dataclass
class ShapeObject:
    """One object. `box` is (x0, y0, x1, y1) in pixels (continuous, x1 exclusive edge)."""

    kind: str
    colour: str
    size: str
    row: int
    col: int
    box: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def to_json(self) -> dict:
        return {"kind": self.kind, "colour": self.colour, "size": self.size, "row": self.row,
                "col": self.col, "box": list(self.box), "center": list(self.center)}


@dataclass
class Scene:
    background: str
    objects: list[ShapeObject] = field(default_factory=list)


# ----------------------------------------------------------------------------- geometry and drawing

def coverage(kind: str, box, window: tuple[int, int, int, int]) -> np.ndarray:
    """Fraction of each pixel covered by the shape, sampled SUPERSAMPLE^2 times per pixel.

    box: (x0, y0, x1, y1) in pixels, the shape's axis-aligned bounding square.
    window: (wx0, wy0, wx1, wy1) integer pixel window to evaluate.
    Returns float32 (wy1 - wy0, wx1 - wx0) in [0, 1].
    """
    wx0, wy0, wx1, wy1 = window
    s = SUPERSAMPLE
    xs = wx0 + (np.arange((wx1 - wx0) * s, dtype=np.float32) + 0.5) / s   # (w*s,)
    ys = wy0 + (np.arange((wy1 - wy0) * s, dtype=np.float32) + 0.5) / s   # (h*s,)
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    dx = np.abs(xs - cx)[None, :]   # (1, w*s)
    dy = np.abs(ys - cy)[:, None]   # (h*s, 1)
    if kind == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif kind == "square":
        inside = (dx <= r) & (dy <= r)
    elif kind == "diamond":
        inside = dx + dy <= r
    elif kind == "cross":
        arm = r / 3  # arms one third of the side wide
        inside = ((dx <= arm) & (dy <= r)) | ((dy <= arm) & (dx <= r))
    elif kind == "triangle":
        # apex at top centre, base along the bottom edge: half-width grows linearly with depth
        depth = (ys - y0)[:, None]
        inside = (depth >= 0) & (depth <= 2 * r) & (dx <= depth / 2)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known kinds: {KINDS}")
    inside = np.broadcast_to(inside, (len(ys), len(xs)))
    h, w = wy1 - wy0, wx1 - wx0
    return inside.reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float32)


def _window(box, size: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (max(0, math.floor(x0)), max(0, math.floor(y0)), min(size, math.ceil(x1)),
            min(size, math.ceil(y1)))


def object_mask(obj: dict | ShapeObject, size: int) -> np.ndarray:
    """Rebuild an object's ground-truth mask (pixels at least half covered) from its kind and box.

    obj: a ShapeObject or one entry of the `objects` column of metadata.jsonl.
    Returns bool (size, size).
    """
    kind, box = (obj["kind"], obj["box"]) if isinstance(obj, dict) else (obj.kind, obj.box)
    window = _window(box, size)
    mask = np.zeros((size, size), dtype=bool)
    mask[window[1]:window[3], window[0]:window[2]] = coverage(kind, box, window) >= 0.5
    return mask


def object_words(obj: dict | ShapeObject) -> set[str]:
    """The caption words that name an object: its colour, kind (singular and plural) and size."""
    kind, colour, size = (obj["kind"], obj["colour"], obj["size"]) if isinstance(obj, dict) else (
        obj.kind, obj.colour, obj.size)
    return {colour, kind, PLURALS[kind], size}


def place_words(row: int, col: int) -> set[str]:
    """The words naming a cell in its position phrase: (0, 0) 'in the top left' -> {'top', 'left'}."""
    return set(POSITION_WORDS[(row, col)].split()) & set(PLACE_WORDS)


def render(scene: Scene, size: int) -> Image.Image:
    """Draw a scene as an RGB image (size, size): background, then antialiased objects."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        wx0, wy0, wx1, wy1 = window = _window(obj.box, size)
        cov = coverage(obj.kind, obj.box, window)[..., None]  # (h, w, 1)
        patch = img[wy0:wy1, wx0:wx1]
        # objects never overlap, so blending each one over the background is exact
        patch += cov * (np.asarray(COLOURS[obj.colour], dtype=np.float32) - patch)
    return Image.fromarray(np.rint(img).astype(np.uint8), mode="RGB")


# ----------------------------------------------------------------------------- scene sampling

def relations_between(a: ShapeObject, b: ShapeObject) -> list[str]:
    """Relations that hold from a to b ("a is <rel> b"), read off the grid cells."""
    rels = []
    if a.row < b.row:
        rels.append("above")
    if a.row > b.row:
        rels.append("below")
    if a.col < b.col:
        rels.append("left of")
    if a.col > b.col:
        rels.append("right of")
    return rels


def held_out_in(scene: Scene, config: ShapesConfig) -> list[str]:
    """Held-out combinations present in a scene, as phrases ("green triangle", "triangle above circle")."""
    found = {f"{o.colour} {o.kind}" for o in scene.objects if (o.colour, o.kind) in config.held_out_pairs}
    for a in scene.objects:
        for b in scene.objects:
            if a is not b:
                found |= {f"{a.kind} {rel} {b.kind}" for rel in relations_between(a, b)
                          if (a.kind, rel, b.kind) in config.held_out_relations}
    return sorted(found)


def _sample_object(rng: random.Random, config: ShapesConfig, cell: int, kind: str,
                   colour: str) -> ShapeObject:
    size_name = rng.choice(tuple(SIZES))
    lo, hi = SIZES[size_name]
    d = rng.randint(math.ceil(lo * GRID), math.floor(hi * GRID))   # side in GRID units
    row, col = divmod(cell, 3)

    def place(c: int) -> int:  # lowest box edge in GRID units keeping the box inside cell c + margin
        first = math.ceil(c * GRID / 3) + MARGIN
        last = math.floor((c + 1) * GRID / 3) - MARGIN - d
        return rng.randint(first, last)

    x0, y0 = place(col), place(row)
    scale = config.size / GRID
    box = (x0 * scale, y0 * scale, (x0 + d) * scale, (y0 + d) * scale)
    return ShapeObject(kind=kind, colour=colour, size=size_name, row=row, col=col, box=box)


def _sample_unconstrained(rng: random.Random, config: ShapesConfig) -> Scene:
    if config.object_count_weights is None:
        n = rng.randint(1, config.max_objects)
    else:
        n = rng.choices(range(1, config.max_objects + 1), weights=config.object_count_weights)[0]
    cells = rng.sample(range(9), n)  # distinct cells, in random order
    pairs = [(rng.choice(KINDS), rng.choice(tuple(COLOURS))) for _ in range(n)]
    if n >= 2 and rng.random() < config.same_group_prob:
        repeat = rng.randint(2, n)  # the first `repeat` objects share kind and colour: "two red circles"
        pairs[1:repeat] = [pairs[0]] * (repeat - 1)
    objects = [_sample_object(rng, config, cell, kind, colour)
               for cell, (kind, colour) in zip(cells, pairs, strict=True)]
    return Scene(background=rng.choice(tuple(BACKGROUNDS)), objects=objects)


def sample_scene(config: ShapesConfig, split: str, index: int) -> Scene:
    """The scene for (config.seed, split, index); independent of every other index.

    train/validation reject scenes containing a held-out combination; heldout keeps only those;
    test is unrestricted.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    # str seeds go through SHA-512 in `random`: stable across runs, platforms and Python versions
    rng = random.Random(f"shapes/{config.seed}/{split}/{index}")
    for _ in range(10_000):
        scene = _sample_unconstrained(rng, config)
        has_held_out = bool(held_out_in(scene, config))
        if split == "test" or has_held_out == (split == "heldout"):
            return scene
    raise ValueError(f"could not sample a {split!r} scene: the held-out lists exclude (almost) everything")


# ----------------------------------------------------------------------------- captions

def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(obj: ShapeObject, with_size: bool) -> str:
    return f"{obj.size} {obj.colour} {obj.kind}" if with_size else f"{obj.colour} {obj.kind}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _grouped(objects: list[ShapeObject], with_size: bool) -> list[str]:
    """'two red circles', 'a blue square': one phrase per (colour, kind) group, in first-seen order."""
    groups: dict[tuple[str, str], list[ShapeObject]] = {}
    for o in objects:
        groups.setdefault((o.colour, o.kind), []).append(o)
    phrases = []
    for (colour, kind), members in groups.items():
        if len(members) == 1:
            phrases.append(_article(_noun(members[0], with_size)))
        else:
            same_size = len({m.size for m in members}) == 1
            size = f"{members[0].size} " if with_size and same_size else ""
            phrases.append(f"{NUMBER_WORDS[len(members)]} {size}{colour} {PLURALS[kind]}")
    return phrases


def captions_for(scene: Scene, rng: random.Random, config: ShapesConfig) -> list[str]:
    """Several distinct phrasings, all true to the scene (positions, relations, counts, sizes)."""
    objs = scene.objects
    with_size = rng.random() < 0.5
    texts = [
        _join(_grouped(objs, with_size)),
        _join([f"{_article(_noun(o, not with_size))} {POSITION_WORDS[(o.row, o.col)]}" for o in objs]),
    ]
    # relations only between objects that their colour+kind name uniquely ("a red circle" is one object)
    unique = [o for o in objs if sum((p.colour, p.kind) == (o.colour, o.kind) for p in objs) == 1]
    if len(unique) >= 2:
        a, b = rng.sample(unique, 2)
        related = [(a, b)]
        if config.relation_pairs == "all":  # after the first draw, so "one" draws what it always drew
            others = [(p, q) for i, p in enumerate(unique) for q in unique[i + 1:]
                      if {id(p), id(q)} != {id(a), id(b)}]
            related += [(p, q) if rng.random() < 0.5 else (q, p) for p, q in others]
        pairs = []
        for a, b in related:
            rel = rng.choice(relations_between(a, b))
            pairs += [(a, rel, b)] + ([(b, CONVERSE[rel], a)] if config.relation_captions == 2 else [])
        for first, r, second in pairs:
            rest = [o for o in objs if o is not first and o is not second]
            rel_words = r if r in ("above", "below") else f"to the {r}"
            text = f"{_article(_noun(first, with_size))} {rel_words} {_article(_noun(second, with_size))}"
            if rest:
                text += ", and " + _join([f"{_article(_noun(o, with_size))} {POSITION_WORDS[(o.row, o.col)]}"
                                          for o in rest])
            texts.append(text)
    if len(objs) == 1:
        o = objs[0]
        texts.append(f"{_article(_noun(o, True))} {POSITION_WORDS[(o.row, o.col)]}")
    prefix = rng.choice(("", "", "a picture of ", "an image of "))
    texts = [prefix + t for t in texts]
    if rng.random() < config.background_caption_prob:
        texts.append(f"{texts[0]} on a {scene.background} background")
    return list(dict.fromkeys(texts))  # dedupe, keep order


def _caption_rng(config: ShapesConfig, split: str, index: int) -> random.Random:
    """The RNG that picks an image's phrasings and its `text` caption (one per index, like its scene's)."""
    return random.Random(f"captions/{config.seed}/{split}/{index}")


def split_captions(config: ShapesConfig, split: str, count: int) -> list[str]:
    """Every phrasing of the first `count` scenes of a split, scene by scene: the `captions` column that
    training reads, without drawing the images (for a model's caption summary, diffusion/vocabulary.py)."""
    return [c for index in range(count)
            for c in captions_for(sample_scene(config, split, index), _caption_rng(config, split, index), config)]


def make_example(config: ShapesConfig, split: str, index: int) -> tuple[Image.Image, dict]:
    """Image and metadata row (without file_name) for one index of one split."""
    scene = sample_scene(config, split, index)
    caption_rng = _caption_rng(config, split, index)
    captions = captions_for(scene, caption_rng, config)
    row = {"text": caption_rng.choice(captions), "captions": captions, "background": scene.background,
           "objects": [o.to_json() for o in scene.objects],
           # a "; "-joined string, not a list: an always-empty list in train would be typed null by
           # `datasets` and clash with the heldout split's list of strings
           "held_out": "; ".join(held_out_in(scene, config))}
    return render(scene, config.size), row


# ----------------------------------------------------------------------------- writing

def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # fixed params, no timestamp chunk: same bytes
    return buf.getvalue()


def _write_chunk(job: tuple[ShapesConfig, str, str, int, int]) -> list[str]:
    config, split, folder, start, stop = job
    lines = []
    for index in range(start, stop):
        img, row = make_example(config, split, index)
        name = f"{index:06d}.png"
        Path(folder, name).write_bytes(_png_bytes(img))
        lines.append(json.dumps({"file_name": name, **row}, separators=(",", ":")))
    return lines


def _dataset_card(counts: dict[str, int]) -> str:
    configs = "\n".join(f"  - split: {s}\n    path: {s}/**" for s in counts if counts[s])
    return (f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}\n---\n"
            "# Procedural captioned shapes\n\nGenerated by `python -m data.shapes`; "
            "see shapes_info.json for the generator config and the held-out combinations.\n")


def _finished_info(path: Path) -> dict:
    """A set's shapes_info.json; config fields added after it was written read as their defaults, which
    draw what the generator drew before they existed (so older caches stay valid)."""
    info = json.loads(path.read_text())
    if isinstance(info.get("config"), dict):
        defaults = json.loads(json.dumps(dataclasses.asdict(ShapesConfig())))
        info["config"] = {**defaults, **info["config"]}
    return info


def generate_dataset(out_dir: str | Path, config: ShapesConfig = ShapesConfig(),
                     counts: dict[str, int] | None = None, workers: int = 2,
                     progress: bool = True, chunk: int = 500, overwrite: bool = False) -> Path:
    """Write the captioned shapes set to `out_dir` in imagefolder layout and return its path.

    counts: images per split, default {"train": 50000, "validation": 1000, "test": 1000,
        "heldout": 1000}. A split with count 0 is skipped.
    If `out_dir` already holds a finished set with the same config and counts it is reused as is;
    any other non-empty `out_dir` is an error unless overwrite=True (then its split folders go).
    """
    counts = dict(counts or {"train": 50_000, "validation": 1000, "test": 1000, "heldout": 1000})
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; choose from {SPLITS}")
    out = Path(out_dir)
    info = {"generator": "data.shapes", "config": dataclasses.asdict(config), "counts": counts,
            "kinds": list(KINDS), "colours": COLOURS, "backgrounds": BACKGROUNDS, "sizes": SIZES,
            "held_out_pairs": [f"{c} {k}" for c, k in config.held_out_pairs],
            "held_out_relations": [" ".join(r) for r in config.held_out_relations],
            "mask": "object_mask(obj, size) from data.shapes rebuilds each mask from kind + box"}
    info_path = out / "shapes_info.json"
    if info_path.exists() and _finished_info(info_path) == json.loads(json.dumps(info)):
        return out  # written completely before: the info file is the last thing written
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty and is not a finished shapes set with this config and "
                             "these counts: choose another folder, or pass overwrite=True (--overwrite) to "
                             "replace its split folders")
        # stale images from a bigger earlier run would otherwise linger beside the new metadata
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
        info_path.unlink(missing_ok=True)
    jobs = []
    for split, n in counts.items():
        if n:
            (out / split).mkdir(parents=True, exist_ok=True)
            jobs += [(config, split, str(out / split), s, min(s + chunk, n)) for s in range(0, n, chunk)]
    lines: dict[str, list[str]] = {split: [] for split in counts}
    bar = tqdm(total=sum(counts.values()), unit="img", desc=f"shapes {config.size}px", disable=not progress)
    with mp.get_context("fork").Pool(workers) if workers > 1 else _Serial() as pool:
        # imap keeps job order, so metadata lines come out in index order whatever the worker count
        for job, chunk_lines in zip(jobs, pool.imap(_write_chunk, jobs), strict=True):
            lines[job[1]] += chunk_lines
            bar.update(len(chunk_lines))
    bar.close()
    for split, split_lines in lines.items():
        if split_lines:
            (out / split / "metadata.jsonl").write_text("\n".join(split_lines) + "\n")
    (out / "README.md").write_text(_dataset_card(counts))
    info_path.write_text(json.dumps(info, indent=1))
    return out


class _Serial:
    """Stand-in for a Pool when workers=1 (no fork: easier to debug and profile)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, jobs):
        return map(fn, jobs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (use cache/..., never committed)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-validation", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-heldout", type=int, default=1000)
    p.add_argument("--object-count-weights", type=float, nargs="+", default=None, metavar="W",
                   help="relative odds of 1, 2, 3 objects per image (default: even)")
    p.add_argument("--same-group-prob", type=float, default=ShapesConfig.same_group_prob,
                   help="chance a multi-object scene repeats one colour and kind (more: more counting captions)")
    p.add_argument("--relation-captions", type=int, default=ShapesConfig.relation_captions, choices=(1, 2),
                   help="2: each relation caption also comes in its converse phrasing")
    p.add_argument("--relation-pairs", default=ShapesConfig.relation_pairs, choices=("one", "all"),
                   help="all: a relation caption for every pair of uniquely named objects, not one pair a scene "
                        "(more relation captions)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace a different set already in --out")
    args = p.parse_args(argv)
    counts = {"train": args.n_train, "validation": args.n_validation, "test": args.n_test,
              "heldout": args.n_heldout}
    t0 = time.perf_counter()
    try:
        weights = tuple(args.object_count_weights) if args.object_count_weights else None
        config = ShapesConfig(size=args.size, seed=args.seed, object_count_weights=weights,
                              same_group_prob=args.same_group_prob,
                              relation_captions=args.relation_captions,
                              relation_pairs=args.relation_pairs)
        out = generate_dataset(args.out, config, counts, args.workers, overwrite=args.overwrite)
    except ValueError as e:  # bad size or a folder in the way: the message says what to do
        p.error(str(e))
    print(f"wrote {sum(counts.values())} images to {out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
