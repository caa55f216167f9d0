"""GenEval in miniature: does the model draw what the prompt says, and do its words look at the right place?

    python evaluate.py --model weights/default                 # default settings, Markdown + JSON in eval/
    python evaluate.py --model runs/default/pipeline --quick   # a small run (CI)
    python evaluate.py --model runs/mine/pipeline --retrieval cache/tuxpaint100   # a fine-tune on your pictures

--retrieval FOLDER (any model, any captions): for captions of the folder, is the sample's nearest picture
the caption's own? Seen captions (train/) look among the training pictures; held-out captions
(heldout/, which the fine-tune never saw) among training and held-out pictures together. Top-1 and
top-5 with chance beside them, and foreground pointing: does each content word's map peak on the drawn
object (pixels that differ from the plain background)? Where the folder has a `category` column (the
clip-art set's), also: is the nearest picture of the caption's category (chance beside it, and the
captions' own pictures' score: the most a new picture of the category gets)? Where the
model folder has a `clip/`, the CLIP-score of the samples and of the captions' own pictures (the reference:
a CLIP that cannot read the captions scores both alike). It writes contact sheets of 16 captions drawn by the
seed (retrieval.png, retrieval_heldout.png: sample, then the caption's own picture) and, with `--nouns K`,
nouns.png: four samples of "a <noun>" for each of the K most common head nouns of the training captions, beside
two of their training pictures, for a person to judge whether each is recognisable; with the model's clip/, also
a check that is not a person's: how often the CLIP finds a sample nearest its own of the K prompts.

Prompts are built from the shapes set's caption grammar (data/shapes.py) and scored by its detector,
which is validated on ground truth at 100% per attribute (python -m data.detector --validate).
GenEval's rule: an image is correct only if every constraint of its prompt holds.

Tasks: single object, colour, two objects, counting, position, colour attribution (the six GenEval
tasks; "overall" is their mean) and unseen combinations (colour–shape pairs and relations held out of
training). Placement, a diagnostic: does "in the top left" put the object in that cell, and do the
maps of "top" and "left" peak there? Attention localisation: for each colour and shape word of
single-object prompts whose object was detected, pointing accuracy (the word's aggregated map peaks
inside the object) and the IoU of the map thresholded at τ (min-max normalised) with the object's
mask, over a τ sweep. CLIP-score: 100 · max(cos(image, prompt), 0) with the shipped small CLIP's
towers (weights/default/clip).

Images are sampled as the app samples them, layout guidance included (diffusion/layout.py: the first
steps' noise is nudged so a relation's word maps are ordered, every object named is attended and
"three X" attends to three places, not four); `--relation-guidance 0 --object-guidance 0` measures
the model without it. Prompts naming one object without a relation are the same either way.
"""

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.detector import Detection, cell, detect, relations
from data.shapes import COLOURS, CONVERSE, KINDS, PLURALS, POSITION_WORDS, ShapesConfig, place_words
from diffusion.layout import OBJECT_GUIDANCE, RELATION_GUIDANCE
from diffusion.pipeline import TextToImagePipeline

GENEVAL_TASKS = ("single_object", "colour", "two_objects", "counting", "position", "colour_attribution")
TASKS = (*GENEVAL_TASKS, "unseen")
UNSEEN_PARTS = ("unseen_pairs", "unseen_relations")  # the unseen task split: a held-out pair, a held-out relation
TAUS = (0.2, 0.3, 0.4, 0.5, 0.6)
RELATION_PHRASES = {"above": "above", "below": "below", "left of": "to the left of", "right of": "to the right of"}
DIRECTIONS = ("right", "inverted", "neither")


@dataclass
class Prompt:
    """A prompt and what must hold in the image: objects as (colour or None = any colour, kind), an exact
    count, a relation. `named` lists the (colour, kind) pairs the text names."""

    task: str
    text: str
    named: list[tuple[str, str]]
    objects: list[tuple[str | None, str]]
    count: int | None = None
    relation: tuple[int, str, int] | None = None  # (index a, "above", index b) into objects
    cell: tuple[int, int] | None = None  # (row, col) of the 3×3 grid the one object must sit in
    words: list[str] = field(default_factory=list)  # words whose maps are localised
    places: list[str] = field(default_factory=list)  # position words whose maps should peak in `cell`


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def seen_pairs(shapes: ShapesConfig) -> list[tuple[str, str]]:
    """The (colour, kind) pairs training saw: every pair but the held-out ones, in a fixed order."""
    held = set(shapes.held_out_pairs)
    return [(c, k) for c in COLOURS for k in KINDS if (c, k) not in held]


def make_prompts(per_task: int, seed: int, shapes: ShapesConfig | None = None) -> list[Prompt]:
    """`per_task` prompts per task; seen tasks avoid held-out pairs, the unseen task uses only them."""
    shapes = shapes or ShapesConfig()  # its held-out pairs and relations are the training set's
    rng = random.Random(seed)
    held = set(shapes.held_out_pairs)
    seen = seen_pairs(shapes)

    def pair(exclude=()):
        return rng.choice([p for p in seen if p not in exclude and p[1] not in {e[1] for e in exclude}])

    out = []
    for _ in range(per_task):
        c, k = pair()
        out.append(Prompt("single_object", article(f"{c} {k}"), [(c, k)], [(None, k)], words=[k]))
        c, k = pair()
        out.append(Prompt("colour", article(f"{c} {k}"), [(c, k)], [(c, k)], words=[c, k]))
        a, b = pair(), None
        b = pair(exclude=[a])
        out.append(Prompt("two_objects", f"{article(f'{a[0]} {a[1]}')} and {article(f'{b[0]} {b[1]}')}",
                          [a, b], [(None, a[1]), (None, b[1])]))
        c, k = pair()
        n = rng.choice((2, 3))
        out.append(Prompt("counting", f"{('two', 'three')[n - 2]} {c} {PLURALS[k]}", [(c, k)], [(None, k)], count=n))
        a = pair()
        b = pair(exclude=[a])
        rel = rng.choice(tuple(RELATION_PHRASES))
        text = f"{article(f'{a[0]} {a[1]}')} {RELATION_PHRASES[rel]} {article(f'{b[0]} {b[1]}')}"
        out.append(Prompt("position", text,
                          [a, b], [(None, a[1]), (None, b[1])], relation=(0, rel, 1)))
        a = pair()
        b = rng.choice([p for p in seen if p[0] != a[0] and p[1] != a[1]])
        out.append(Prompt("colour_attribution", f"{article(f'{a[0]} {a[1]}')} and {article(f'{b[0]} {b[1]}')}",
                          [a, b], [a, b]))
        if rng.random() < 0.5 or not shapes.held_out_relations:
            c, k = rng.choice(sorted(held))
            out.append(Prompt("unseen", article(f"{c} {k}"), [(c, k)], [(c, k)], words=[c, k]))
        else:
            ka, rel, kb = rng.choice(shapes.held_out_relations)
            ca = rng.choice([c for c in COLOURS if (c, ka) not in held])
            cb = rng.choice([c for c in COLOURS if (c, kb) not in held and c != ca])
            out.append(Prompt("unseen", f"{article(f'{ca} {ka}')} {RELATION_PHRASES[rel]} {article(f'{cb} {kb}')}",
                              [(ca, ka), (cb, kb)], [(ca, ka), (cb, kb)], relation=(0, rel, 1)))
    return out


def placement_prompts(seed: int, shapes: ShapesConfig | None = None) -> list[Prompt]:
    """One prompt per grid cell, "a red circle in the top left": does the layout follow position words?
    A diagnostic beside the GenEval tasks (chance: 1/9); relations need it, but do not show it apart."""
    rng = random.Random(f"placement/{seed}")
    seen = seen_pairs(shapes or ShapesConfig())
    out = []
    for where, words in POSITION_WORDS.items():
        c, k = rng.choice(seen)
        out.append(Prompt("placement", f"{article(f'{c} {k}')} {words}", [(c, k)], [(c, k)], cell=where,
                          places=sorted(place_words(*where))))
    return out


def find(dets: list[Detection], colour: str | None, kind: str) -> list[Detection]:
    return [d for d in dets if d.kind == kind and (colour is None or d.colour == colour)]


def matched(prompt: Prompt, dets: list[Detection]) -> list[Detection] | None:
    """The one detection of each prompt object, or None if anything is missing, extra or ambiguous."""
    if len(dets) != len(prompt.objects):  # nothing missing, nothing extra
        return None
    matches = [find(dets, colour, kind) for colour, kind in prompt.objects]
    return None if any(len(m) != 1 for m in matches) else [m[0] for m in matches]


def correct(prompt: Prompt, dets: list[Detection], image_size: int) -> bool:
    """GenEval's rule: every constraint of the prompt holds in the detected objects."""
    if prompt.count is not None:
        kind = prompt.objects[0][1]
        return len(find(dets, None, kind)) == prompt.count and len(dets) == prompt.count
    objects = matched(prompt, dets)
    if objects is None:
        return False
    if prompt.relation is not None:
        a, rel, b = prompt.relation
        return rel in relations(objects[a].center, objects[b].center, image_size)
    if prompt.cell is not None:
        return cell(objects[0].center, image_size) == prompt.cell
    return True


def relation_direction(prompt: Prompt, dets: list[Detection], image_size: int) -> str | None:
    """For a relation prompt whose two objects were drawn (and nothing else): "right", "inverted" (the
    opposite relation holds) or "neither" (same row or column). None when there is no such pair.
    Right ≈ inverted means the model ignores the relation words."""
    objects = matched(prompt, dets) if prompt.relation is not None else None
    if objects is None:
        return None
    a, rel, b = prompt.relation
    found = relations(objects[a].center, objects[b].center, image_size)
    return "right" if rel in found else "inverted" if CONVERSE[rel] in found else "neither"


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def localisation(heat: torch.Tensor, mask: np.ndarray) -> tuple[bool, list[float]]:
    """Does the (H, W) map peak inside the mask; IoU of the map ≥ τ (min-max normalised) per τ."""
    h = heat.float()
    h = (h - h.min()) / (h.max() - h.min()).clamp_min(1e-12)
    peak = np.unravel_index(int(h.argmax()), h.shape)
    m = torch.from_numpy(mask)
    ious = []
    for tau in TAUS:
        region = h >= tau
        union = (region | m).sum().item()
        ious.append((region & m).sum().item() / union if union else 0.0)
    return bool(mask[peak]), ious


class ClipScorer:
    """CLIP-score (Hessel et al. 2021, as torchmetrics computes it): 100 · max(cos(image, text), 0)."""

    def __init__(self, clip_dir: str | Path):
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(clip_dir).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
        self.size = self.model.config.vision_config.image_size

    @torch.no_grad()
    def embed(self, images: list, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image embeddings (B, D) and text embeddings (T, D)."""
        from conditioning.clip_images import to_pixel_values

        pixels = to_pixel_values(torch.stack([
            torch.from_numpy(np.array(im.convert("RGB").resize((self.size, self.size)))).permute(2, 0, 1)
            for im in images
        ]))  # (B, 3, S, S), CLIP-normalised
        ids = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = self.model(**ids, pixel_values=pixels)
        return out.image_embeds, out.text_embeds  # CLIPModel returns them normalised

    def __call__(self, images: list, texts: list[str]) -> list[float]:
        image, text = self.embed(images, texts)
        return (100 * (image * text).sum(-1).clamp_min(0)).tolist()

    def pick(self, images: list, texts: list[str]) -> list[int]:
        """Zero-shot: for each image, the index of the text it is nearest to."""
        image, text = self.embed(images, texts)
        return (image @ text.T).argmax(dim=1).tolist()


def evaluate(pipe: TextToImagePipeline, per_task: int = 16, images_per_prompt: int = 4, steps: int = 20,
             guidance: float = 4.0, sampler: str = "dpm++", seed: int = 0, progress: bool = True,
             clip: "ClipScorer | None" = None, relation_guidance: float = RELATION_GUIDANCE,
             object_guidance: float = OBJECT_GUIDANCE) -> dict:
    prompts = make_prompts(per_task, seed) + placement_prompts(seed)
    size = pipe.unet.config.sample_size
    hits: dict[str, list[bool]] = {t: [] for t in (*TASKS, *UNSEEN_PARTS, "placement")}
    directions = dict.fromkeys(DIRECTIONS, 0)  # relation prompts with both objects right
    pointing, ious, clip_scores = [], [], []
    place_hits: list[bool] = []  # placement prompts: a position word's map peaks in the named cell
    by_layer: dict[str, tuple[list[bool], list[list[float]]]] = {}
    examples = []
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        result = pipe(prompt.text, num_images=images_per_prompt, steps=steps, guidance_scale=guidance,
                      sampler=sampler, seed=seed + 1000 * i, relation_guidance=relation_guidance,
                      object_guidance=object_guidance,
                      record_attention=bool(prompt.words or prompt.places))
        if clip is not None:
            clip_scores += clip(result.images, [prompt.text] * len(result.images))
        for j, image in enumerate(result.images):
            dets = detect(image)
            ok = correct(prompt, dets, size)
            hits[prompt.task].append(ok)
            if prompt.task == "unseen":
                hits[UNSEEN_PARTS[prompt.relation is not None]].append(ok)
            if (direction := relation_direction(prompt, dets, size)) is not None:
                directions[direction] += 1
            if len(examples) < 40:
                examples.append({"task": prompt.task, "prompt": prompt.text, "correct": ok,
                                 "detected": [f"{d.size} {d.colour} {d.kind}" for d in dets]})
            if prompt.places:
                maps = result.attention.word_maps(j, normalize="absolute")
                for word in prompt.places:
                    if word in maps:
                        y, x = np.unravel_index(int(maps[word].float().argmax()), maps[word].shape)
                        place_hits.append(cell((x + 0.5, y + 0.5), maps[word].shape[-1]) == prompt.cell)
            if prompt.words and len(dets) == 1:
                for layer in [None, *result.attention.layers("cross")]:  # all layers' mean, then each layer
                    maps = result.attention.word_maps(j, layer=layer, normalize="absolute")
                    for word in prompt.words:
                        if word in maps:
                            hit, iou = localisation(maps[word], dets[0].mask)
                            hits_l, ious_l = (pointing, ious) if layer is None else by_layer.setdefault(layer, ([], []))
                            hits_l.append(hit)
                            ious_l.append(iou)
        if progress:
            print(f"[{i + 1}/{len(prompts)}] {prompt.task:<18} {prompt.text!r}: "
                  f"{sum(hits[prompt.task][-images_per_prompt:])}/{images_per_prompt}", flush=True)
    scores = {}
    for task, h in hits.items():
        lo, hi = wilson(sum(h), len(h))
        scores[task] = {"score": sum(h) / max(1, len(h)), "ci95": [lo, hi], "images": len(h)}
    scores["overall"] = {"score": float(np.mean([scores[t]["score"] for t in GENEVAL_TASKS]))}
    miou = np.mean(ious, axis=0).tolist() if ious else [0.0] * len(TAUS)
    lo, hi = wilson(sum(pointing), len(pointing))
    attention = {"pointing_accuracy": sum(pointing) / max(1, len(pointing)), "pointing_ci95": [lo, hi],
                 "words": len(pointing), "miou_by_tau": dict(zip(map(str, TAUS), miou, strict=True)),
                 "miou": max(miou),
                 "place_pointing": sum(place_hits) / max(1, len(place_hits)), "place_words": len(place_hits),
                 "by_layer": {name: {"pointing_accuracy": sum(h) / len(h), "miou": float(max(np.mean(i, axis=0)))}
                              for name, (h, i) in by_layer.items()}}
    settings = {"per_task": per_task, "images_per_prompt": images_per_prompt, "steps": steps,
                "guidance": guidance, "sampler": sampler, "seed": seed, "relation_guidance": relation_guidance,
                "object_guidance": object_guidance,
                "seconds": time.perf_counter() - t0}
    clip_score = float(np.mean(clip_scores)) if clip_scores else None
    return {"scores": scores, "attention": attention, "clip_score": clip_score, "settings": settings,
            "relation_directions": directions, "examples": examples}


# -- retrieval: did a fine-tune learn the user's own captions? ------------------------------------------
FUNCTION_WORDS = frozenset("a an the of to on in at and or with for is it its by from as this that".split())


def pixels_of(folder: str, split: str, resolution: int) -> tuple[torch.Tensor, list[str], list[str] | None]:
    """(N, 3, R, R) in [-1, 1] as training reads them, each picture's caption (its `text`), and its `category`
    where the folder has that column (data.clipart's: "animals", "food", …), else None."""
    from data.loading import LoadConfig, load_captioned

    data = load_captioned(folder, LoadConfig(resolution=resolution, split=split))
    texts = [data.hf[r]["text"] for r in data.rows]
    texts = [t if isinstance(t, str) else t[0] for t in texts]
    categories = [data.hf[r]["category"] for r in data.rows] if "category" in data.hf.column_names else None
    return torch.stack([data[i]["pixel_values"] for i in range(len(data))]), texts, categories


def signature(images: torch.Tensor) -> torch.Tensor:
    """What 'nearest picture' compares: 16 × 16 area means, (N, 768). Robust to a pixel's shift."""
    return torch.nn.functional.adaptive_avg_pool2d(images.float(), 16).flatten(1)


def rank_of_own(samples: torch.Tensor, candidates: torch.Tensor, own: list[int]) -> list[int]:
    """Per sample, the rank (0 = nearest) of its own picture among the candidates, by L2 distance."""
    d = torch.cdist(signature(samples), signature(candidates))  # (S, N)
    own_d = d[torch.arange(len(own)), torch.tensor(own)]
    return (d < own_d[:, None]).sum(dim=1).tolist()


def nearest(samples: torch.Tensor, candidates: torch.Tensor) -> list[int]:
    """Per sample, the index of the nearest candidate (the same distance as rank_of_own)."""
    return torch.cdist(signature(samples), signature(candidates)).argmin(dim=1).tolist()


def category_scores(samples: torch.Tensor, candidates: torch.Tensor, categories: list[str],
                    own: list[int]) -> dict:
    """Is each sample's nearest picture of its caption's category? top-1 against chance (a random picture's
    category matching, averaged over the captions) and against what the captions' own pictures score
    (`own_pictures`: each own picture's nearest *other* picture of its category): the share a new, real
    picture of the category gets, the most a sample can get without copying its own picture."""
    pictures = signature(candidates)
    near = torch.cdist(signature(samples), pictures).argmin(dim=1).tolist()  # as nearest(), the pooling done once
    hits = [categories[n] == categories[o] for n, o in zip(near, own, strict=True)]
    d = torch.cdist(pictures[own], pictures)
    d[torch.arange(len(own)), torch.tensor(own)] = float("inf")  # itself does not count
    real = [categories[n] == categories[o] for n, o in zip(d.argmin(dim=1).tolist(), own, strict=True)]
    share = {c: categories.count(c) / len(categories) for c in set(categories)}
    return {"top1": sum(hits) / len(hits), "chance": sum(share[categories[o]] for o in own) / len(own),
            "own_pictures": sum(real) / len(real), "categories": len(share)}


def foreground(image: torch.Tensor, threshold: float = 0.1) -> np.ndarray:
    """(H, W) bool: pixels that differ from the image's border colour (the plain background)."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)  # (3, 4R)
    background = border.median(dim=1).values[:, None, None]
    return ((image - background).abs().amax(dim=0) > 2 * threshold).numpy()


def evaluate_retrieval(pipe: TextToImagePipeline, folder: str, max_captions: int = 96, steps: int = 20,
                       guidance: float = 4.0, sampler: str = "dpm++", seed: int = 0, batch: int = 16,
                       sheet: Path | None = None, clip: "ClipScorer | None" = None) -> dict:
    """Sample one image per caption (seen: up to max_captions of train/, spread; held-out: heldout/) and
    score top-1/top-5 retrieval of the caption's own picture, and content words' foreground pointing; where
    the folder has a `category` column, whether the nearest picture is of the caption's category; with `clip`,
    the CLIP-score of the samples and, for reference, of the captions' own pictures.
    `sheet`: also write PNGs of 16 captions' samples beside their own pictures, drawn by `seed`: seen captions to
    `sheet`, held-out ones to `<sheet>_heldout.png`."""
    size = pipe.unet.config.sample_size
    train, train_texts, train_cats = pixels_of(folder, "train", size)
    splits = {"seen": (train, train_texts, 0, train_cats)}
    try:
        held, held_texts, held_cats = pixels_of(folder, "heldout", size)
        cats = train_cats + held_cats if train_cats and held_cats else None
        splits["heldout"] = (torch.cat([train, held]), held_texts, len(train), cats)
    except ValueError:
        pass  # no held-out split: seen captions only
    report, pointing, t0 = {}, [], time.perf_counter()
    for name, (candidates, texts, offset, categories) in splits.items():
        n_picks = min(max_captions, len(texts))
        picks = sorted({k * len(texts) // n_picks for k in range(n_picks)})  # spread through the split
        samples = []
        for start in range(0, len(picks), batch):
            chunk = picks[start:start + batch]
            result = pipe([texts[i] for i in chunk], num_images=1, steps=steps, guidance_scale=guidance,
                          sampler=sampler, seed=seed + start, record_attention=True)
            for j, image in enumerate(result.images):
                x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                samples.append(x)
                fg = foreground(x)
                if 0.02 < fg.mean() < 0.9:  # a plain background and something drawn on it
                    for word, heat in result.attention.word_maps(j, normalize="absolute").items():
                        if word.isalpha() and word not in FUNCTION_WORDS:
                            y, xx = np.unravel_index(int(heat.float().argmax()), heat.shape)
                            pointing.append(bool(fg[y, xx]))
        own = [offset + i for i in picks]
        ranks = rank_of_own(torch.stack(samples), candidates, own)
        if sheet is not None:  # 16 pairs drawn by the seed, not picked by hand
            shown = sorted(random.Random(seed).sample(range(len(samples)), min(16, len(samples))))
            contact_sheet([samples[k] for k in shown], [candidates[own[k]] for k in shown],
                          sheet if name == "seen" else sheet.with_name(f"{sheet.stem}_{name}{sheet.suffix}"),
                          [texts[picks[k]] for k in shown])
        n = len(candidates)
        report[name] = {"captions": len(picks), "candidates": n,
                        "top1": sum(r < 1 for r in ranks) / len(ranks), "top5": sum(r < 5 for r in ranks) / len(ranks),
                        "chance_top1": 1 / n, "chance_top5": min(1.0, 5 / n),
                        "examples": [{"caption": texts[i], "rank": r} for i, r in zip(picks[:12], ranks, strict=False)]}
        if categories is not None:
            report[name]["category"] = category_scores(torch.stack(samples), candidates, categories, own)
        if clip is not None:
            captions = [texts[i] for i in picks]
            report[name]["clip_score"] = float(np.mean(clip([to_pil(x) for x in samples], captions)))
            report[name]["clip_score_own_pictures"] = float(np.mean(clip([to_pil(candidates[i]) for i in own],
                                                                         captions)))
    report["foreground_pointing"] = {"score": sum(pointing) / max(1, len(pointing)), "words": len(pointing)}
    report["settings"] = {"folder": folder, "steps": steps, "guidance": guidance, "sampler": sampler, "seed": seed,
                          "seconds": round(time.perf_counter() - t0, 1)}
    return report


def to_pil(x: torch.Tensor):
    """(3, H, W) in [-1, 1] → a PIL image."""
    from PIL import Image

    return Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def contact_sheet(samples: list[torch.Tensor], own: list[torch.Tensor], path: Path, captions: list[str] | None = None,
                  scale: int = 4) -> None:
    """Pairs side by side, four pairs a row: each sample, then the picture its caption describes, and the caption
    under them."""
    from PIL import Image, ImageDraw, ImageFont

    side = samples[0].shape[-1] * scale
    label = 18 if captions else 0
    font = ImageFont.load_default(size=14)
    rows = math.ceil(len(samples) / 4)
    out = Image.new("RGB", (4 * (2 * side + side // 4), rows * (side + side // 8 + label)), "white")
    draw = ImageDraw.Draw(out)
    for k, (a, b) in enumerate(zip(samples, own, strict=True)):
        x, y = (k % 4) * (2 * side + side // 4), (k // 4) * (side + side // 8 + label)
        out.paste(to_pil(a).resize((side, side), Image.NEAREST), (x, y))
        out.paste(to_pil(b).resize((side, side), Image.NEAREST), (x + side, y))
        if captions:
            draw.text((x + 2, y + side + 1), captions[k][:2 * side // 7], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def head_nouns(captions: list[str], k: int = 20) -> list[str]:
    """The k most common head nouns of short captions: each caption's last word ("a red flower" -> flower), a
    plural counted with its singular ("frogs" -> frog) where the singular is a head noun too."""
    last = [c.lower().split()[-1] for c in captions if c.split() and c.split()[-1].isalpha()]
    singular = set(last)
    counts: dict[str, int] = {}
    for word in last:
        word = word[:-1] if word.endswith("s") and word[:-1] in singular else word
        counts[word] = counts.get(word, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))[:k]


def noun_sheet(pipe: TextToImagePipeline, folder: str, path: Path, nouns: int = 20, per_noun: int = 4,
               steps: int = 20, guidance: float = 4.0, sampler: str = "dpm++", seed: int = 0,
               clip: "ClipScorer | None" = None) -> dict:
    """The sheet a person judges "is it recognisable?" on: one row per common head noun of the training captions,
    `per_noun` samples of "a <noun>" (seeds seed, seed + 1, ...: drawn, not chosen), then, after a gap, two
    training pictures whose caption ends in that noun, for reference. Returns {"nouns": [top row first, ...]} and,
    with `clip`, a check beside the person's: "zero_shot", the share of samples whose nearest of the K prompts
    "a <noun>" (by the CLIP) is their own, per noun and overall, against chance (1/K) and against what up to
    `per_noun` training pictures of each noun score (the CLIP saw those: a ceiling, not a peer)."""
    from PIL import Image, ImageDraw, ImageFont

    size = pipe.unet.config.sample_size
    train, texts, _ = pixels_of(folder, "train", size)
    words = head_nouns(texts, nouns)
    prompts = [f"{'an' if w[0] in 'aeiou' else 'a'} {w}" for w in words]
    scale, label = 3, 90
    font = ImageFont.load_default(size=16)
    side = size * scale
    out = Image.new("RGB", (label + (per_noun + 3) * side, len(words) * (side + 4)), "white")
    draw = ImageDraw.Draw(out)
    hits = {"samples": {}, "training_pictures": {}}
    for row, (word, prompt) in enumerate(zip(words, prompts, strict=True)):
        images = pipe([prompt], num_images=per_noun, steps=steps, guidance_scale=guidance, sampler=sampler,
                      seed=seed).images  # image j has seed seed + j
        own = [i for i, t in enumerate(texts) if t.lower().split()[-1] in (word, word + "s")][:per_noun]
        y = row * (side + 4)
        draw.text((4, y + side // 2 - 8), prompt, fill="black", font=font)
        for j, image in enumerate(images):
            out.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (label + j * side, y))
        for j, i in enumerate(own[:2]):
            out.paste(to_pil(train[i]).resize((side, side), Image.NEAREST), (label + (per_noun + 1 + j) * side, y))
        if clip is not None:
            for kind, shown in (("samples", images), ("training_pictures", [to_pil(train[i]) for i in own])):
                if not shown:
                    continue
                picked = clip.pick(shown, prompts)
                hits[kind][word] = sum(p == row for p in picked) / len(picked)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    report = {"nouns": words}
    if clip is not None:
        report["zero_shot"] = {kind: {"score": float(np.mean(list(h.values()))), "per_noun": h}
                               for kind, h in hits.items()} | {"chance": 1 / len(words)}
    return report


def retrieval_markdown(report: dict, model: str) -> str:
    lines = [f"## Retrieval of `{model}` on `{report['settings']['folder']}`", "",
             "| captions | n | candidates | top-1 (chance) | top-5 (chance) |", "|---|---|---|---|---|"]
    extra = []
    for name in ("seen", "heldout"):
        if name in report:
            r = report[name]
            lines.append(f"| {name} | {r['captions']} | {r['candidates']} | {r['top1']:.2f} ({r['chance_top1']:.3f}) "
                         f"| {r['top5']:.2f} ({r['chance_top5']:.3f}) |")
            if "category" in r:
                c = r["category"]
                extra.append(f"{name}: the nearest picture is of the caption's category {c['top1']:.2f} (chance "
                             f"{c['chance']:.2f}, {c['categories']} categories; the captions' own pictures, nearest "
                             f"other picture: {c['own_pictures']:.2f}).")
            if "clip_score" in r:
                extra.append(f"{name}: CLIP-score {r['clip_score']:.1f} (the captions' own pictures: "
                             f"{r['clip_score_own_pictures']:.1f}).")
    fp = report["foreground_pointing"]
    extra.append(f"Foreground pointing of content words: {fp['score']:.2f} ({fp['words']} words).")
    if zs := report.get("nouns", {}).get("zero_shot"):
        extra.append(f"Nouns (nouns.png), the CLIP's zero-shot check: {zs['samples']['score']:.2f} of the samples of "
                     f"\"a <noun>\" are nearest their own of the {len(report['nouns']['nouns'])} prompts (chance "
                     f"{zs['chance']:.2f}; training pictures of the nouns: {zs['training_pictures']['score']:.2f}).")
    lines += ["", *extra, ""]
    return "\n".join(lines)


def markdown(report: dict, model: str) -> str:
    s = report["scores"]
    lines = [f"## Evaluation of `{model}`", "", "| task | score | 95% interval | images |", "|---|---|---|---|"]
    for task in TASKS:
        r = s[task]
        lines.append(f"| {task.replace('_', ' ')} | {r['score']:.3f} | {r['ci95'][0]:.2f}–{r['ci95'][1]:.2f} | "
                     f"{r['images']} |")
    lines.append(f"| **overall** (mean of the six GenEval tasks) | **{s['overall']['score']:.3f}** | | |")
    if all(s.get(part, {}).get("images") for part in UNSEEN_PARTS):
        pairs, rels = s["unseen_pairs"], s["unseen_relations"]
        lines += ["", f"Unseen, split: held-out colour–shape pairs {pairs['score']:.3f} of {pairs['images']} images "
                      f"({pairs['ci95'][0]:.2f}–{pairs['ci95'][1]:.2f}), held-out relations {rels['score']:.3f} of "
                      f"{rels['images']} ({rels['ci95'][0]:.2f}–{rels['ci95'][1]:.2f})."]
    if p := s.get("placement"):
        lines += ["", f"Placement (a diagnostic, not a GenEval task): with a position word (\"a red circle in the "
                      f"top left\"), the one object sits in the named cell in {p['score']:.3f} of {p['images']} "
                      f"images ({p['ci95'][0]:.2f}–{p['ci95'][1]:.2f}; chance 0.111)."]
    if d := report.get("relation_directions"):
        lines += ["", f"Relation prompts (position, unseen) with both objects drawn: the relation holds in "
                      f"{d['right']}, the opposite one in {d['inverted']}, neither in {d['neither']}."]
    a = report["attention"]
    lines += ["", "| attention localisation | value |", "|---|---|",
              f"| pointing accuracy ({a['words']} words) | {a['pointing_accuracy']:.3f} "
              f"({a['pointing_ci95'][0]:.2f}–{a['pointing_ci95'][1]:.2f}) |",
              f"| mIoU (best τ) | {a['miou']:.3f} |"]
    if a.get("place_words"):
        lines.append(f"| position words peaking in the named cell ({a['place_words']} words; chance 0.111) "
                     f"| {a['place_pointing']:.3f} |")
    lines += [f"| mIoU at τ = {tau} | {v:.3f} |" for tau, v in a["miou_by_tau"].items()]
    if a.get("by_layer"):
        lines += ["", "| layer (alone) | pointing | mIoU (best τ) |", "|---|---|---|"]
        lines += [f"| {name} | {v['pointing_accuracy']:.3f} | {v['miou']:.3f} |" for name, v in a["by_layer"].items()]
    if report.get("clip_score") is not None:
        lines += ["", f"CLIP-score (shipped small CLIP, 100 · max(cos, 0)): {report['clip_score']:.1f}"]
    st = report["settings"]
    lines += ["", f"{st['per_task']} prompts per task × {st['images_per_prompt']} images, {st['steps']} "
              f"{st['sampler']} steps, guidance {st['guidance']}, relation guidance "
              f"{st.get('relation_guidance', 0):g}, object guidance {st.get('object_guidance', 0):g}, "
              f"seed {st['seed']}, U-Net in {st.get('dtype', 'float32')}; "
              f"{st['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="weights/default", help="pipeline folder (unet/, text_encoder/, …)")
    parser.add_argument("--out", default="eval", help="folder for report.md and report.json")
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--sampler", default="dpm++")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relation-guidance", type=float, default=RELATION_GUIDANCE,
                        help="η of relation guidance (diffusion/layout.py), as the app samples; 0 measures the model "
                             "without it")
    parser.add_argument("--object-guidance", type=float, default=OBJECT_GUIDANCE,
                        help="η of object guidance (diffusion/layout.py), as the app samples; 0 measures the model "
                             "without it")
    parser.add_argument("--clip", default="weights/default/clip", help="CLIP for the CLIP-score ('' to skip)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="U-Net compute type")
    parser.add_argument("--quick", action="store_true", help="2 prompts per task, 2 images each, 10 steps")
    parser.add_argument("--retrieval", metavar="FOLDER", default=None,
                        help="score retrieval on a captioned folder (train/ + heldout/) instead of the shapes tasks")
    parser.add_argument("--max-captions", type=int, default=96, help="with --retrieval: captions per split")
    parser.add_argument("--nouns", type=int, default=0, metavar="K",
                        help="with --retrieval: also write nouns.png, 4 samples of 'a <noun>' for each of the K most "
                             "common head nouns of the training captions beside two of their training pictures")
    args = parser.parse_args(argv)
    if args.retrieval:
        pipe = TextToImagePipeline.from_pretrained(args.model, dtype=args.dtype)
        own_clip = Path(args.model) / "clip"  # the model's own CLIP reads its captions' words
        clip = ClipScorer(own_clip) if own_clip.is_dir() else None
        report = evaluate_retrieval(pipe, args.retrieval, args.max_captions, args.steps, args.guidance,
                                    args.sampler, args.seed, sheet=Path(args.out) / "retrieval.png", clip=clip)
        report["model"] = args.model
        out = Path(args.out)
        if args.nouns:
            report["nouns"] = noun_sheet(pipe, args.retrieval, out / "nouns.png", args.nouns, steps=args.steps,
                                         guidance=args.guidance, sampler=args.sampler, seed=args.seed, clip=clip)
        out.mkdir(parents=True, exist_ok=True)
        (out / "retrieval.json").write_text(json.dumps(report, indent=2))
        (out / "retrieval.md").write_text(retrieval_markdown(report, args.model))
        print(retrieval_markdown(report, args.model))
        return report
    if args.quick:
        args.per_task, args.images_per_prompt, args.steps = 2, 2, 10
    torch.set_num_threads(torch.get_num_threads())
    pipe = TextToImagePipeline.from_pretrained(args.model, dtype=args.dtype)
    clip = ClipScorer(args.clip) if args.clip else None
    report = evaluate(pipe, args.per_task, args.images_per_prompt, args.steps, args.guidance, args.sampler, args.seed,
                      clip=clip, relation_guidance=args.relation_guidance, object_guidance=args.object_guidance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["model"] = args.model
    report["settings"]["dtype"] = str(pipe.dtype).removeprefix("torch.")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report, args.model))
    print(markdown(report, args.model))
    return report


if __name__ == "__main__":
    main()
