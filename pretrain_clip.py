"""Contrastive pre-training of a small CLIP on captioned images: the offline default text encoder.

    python -m data.shapes --out cache/shapes32 --size 32                     # the captioned shapes set
    python pretrain_clip.py --data cache/shapes32 --out runs/clip
    python pretrain_clip.py --data cache/shapes32 --out runs/clip --resume   # continue
    python pretrain_clip.py --data cache/shapes32 --eval runs/clip           # retrieval top-1

    # the clip-art CLIP: real words from openclipart plus the shapes set, the shipped tokenizer grown with
    # whole-word tokens for the captions' common words (its old ids kept)
    python -m data.clipart --out cache/clipart64
    python -m data.shapes --out cache/shapes64 --size 64 --n-train 20000
    python pretrain_clip.py --preset clipart --data cache/clipart64 cache/shapes64 \
        --tokenizer weights/default/tokenizer --out runs/clip-clipart

On a CPU shared with other jobs, run it with `nice -n 10` and `OMP_NUM_THREADS=1`: with two cores
and other processes busy, two oversubscribed threads ran 2.5x slower per step than one thread here.

Steps: (1) a BPE tokenizer in CLIP's format is trained on the training captions (conditioning/tokenizer.py),
(2) a small `transformers.CLIPModel` (text tower + ViT image tower) is trained with CLIP's symmetric
InfoNCE loss (`return_loss=True`) under `accelerate` (bf16 autocast where the CPU/GPU has fast bf16),
AdamW, warmup + cosine, (3) retrieval top-1 among 100 candidates is printed on the validation split
while training and at the end. `--out` then holds:

    clip/           the whole CLIPModel + tokenizer + preprocessor_config.json (CLIPModel / CLIPProcessor
                    .from_pretrained; its image tower gives a CLIP-score)
    text_encoder/   CLIPTextModel       tokenizer/   vocab.json merges.txt tokenizer.json tokenizer_config.json
                    (the two parts of a pipeline folder: `TextEncoder.from_pretrained(out)` loads them)
    pretrain_config.json  metrics.jsonl  retrieval.json  README.md (model card with the scores)
    checkpoints/step_NNNNNN/    model + optimizer (safetensors) + state.json, for --resume (core/checkpoints.py,
                                the scheme train.py uses; the schedule is rebuilt from the step)

Checkpoints written before this scheme (accelerate's save_state: optimizer.bin, random_states_0.pkl) do not
resume: --resume says so; start a new --out.

Images are not augmented by default: flips would break "left of"/"right of", crops "in the top left".
A folder of single drawings on white (clip art) may be (`augment`): each picture zoomed out by a random
factor, and mirrored where no caption says left or right. Captions are: when the data lists several
true phrasings of an image, a fresh one is drawn every step.

Several `--data` folders train one model: each batch takes a fixed share from each (`data_weights`,
default in proportion to their sizes), each folder is scored on its own validation split (`validation`,
or `heldout` where that is the only held-out split, as in data.clipart), and the first folder's scores
are the headline ones.
"""

import argparse
import dataclasses
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from conditioning.clip_images import CLIP_MEAN, CLIP_STD, to_pixel_values, zoom_out_on_white
from conditioning.text_encoder import TextEncoder
from conditioning.tokenizer import grow_tokenizer, save_clip_tokenizer, train_clip_bpe
from core.checkpoints import checkpoints, load_optimizer, lr_schedule, optimizer_tensors, save_checkpoint
from core.loader import shuffled_loader
from core.precision import mixed_precision
from data.loading import ImageTextPairs, SplitNotFound, load_pairs, load_table
from data.shapes import Scene, ShapeObject, ShapesConfig, captions_for


@dataclass
class PretrainConfig:
    """Everything that defines a pre-training run; saved as pretrain_config.json beside the model."""

    # text: captions are short (the shapes set's longest is 31 tokens with start/end): 32 positions, not CLIP's 77
    max_length: int = 32
    vocab_size: int = 2048  # upper bound; a small caption vocabulary stops the BPE trainer earlier
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    # image: 32 px in 4 px patches = 64 patch tokens + CLS
    image_size: int = 32
    patch_size: int = 4
    # the image tower reads 65 tokens against the text's ~15-30 and dominated the CPU cost at width 256;
    # 128 wide is ~2x cheaper. Its errors are mostly shape kinds (not colours): with more compute, widen it.
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    projection_dim: int = 256
    # optimisation
    # 410k pairs, 8 epochs of the 50k shapes set: ~80 min on a shared 2-core CPU (1 thread, bf16); the shipped
    # run crossed 0.90 retrieval at ~2600 steps
    steps: int = 3200
    batch_size: int = 128  # more updates per CPU-hour than 256; 127 negatives are plenty for this data
    lr: float = 7e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    # bookkeeping
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    candidates: int = 100  # retrieval top-1 is measured among this many images / captions
    eval_size: int = 1000  # validation pairs scored while training (the final score uses all of them)
    val_holdout: int = 1000  # pairs held out of train when the data has no validation split
    seed: int = 0
    # several --data folders: each batch's share from each (normalised); empty: in proportion to their sizes
    data_weights: tuple[float, ...] = ()
    # a CLIP-format tokenizer folder to grow (old ids kept, conditioning.tokenizer.grow_tokenizer) with a
    # whole-word token for every caption word used >= min_word_count times; empty: train a BPE from scratch
    base_tokenizer: str = ""
    min_word_count: int = 2
    # per --data folder: True zooms its pictures out on white by a random factor (>= augment_min_scale) and
    # mirrors those whose captions say neither left nor right (clip_images.zoom_out_on_white). Only for
    # pictures of one drawing on white (clip art): the shapes set's captions name positions. Empty: none.
    augment: tuple[bool, ...] = ()
    augment_min_scale: float = 0.75


PRESETS = {
    "small": PretrainConfig(),
    # a seconds-long run for tests and smoke checks: no quality expected
    "tiny": PretrainConfig(
        max_length=16, text_width=32, text_layers=1, text_heads=2, vision_width=32, vision_layers=1,
        vision_heads=2, projection_dim=32, steps=4, batch_size=8, warmup_steps=1, eval_every=2,
        checkpoint_every=2, candidates=4, eval_size=8, val_holdout=4,
    ),
    # clip art at 64 px (8 px patches: 64 patch tokens, as the shapes CLIP's 32 px in 4 px ones) plus the shapes
    # set; half of each batch is clip art, which has only ~1,900 training pairs against the shapes set's 20,000.
    # The small widths, measured at batch 128 on one thread of this CPU (bf16): 4.2 M parameters, 1.1 s a step
    # (~3,300 steps an hour), against 2.9-3.2 s for text 384x6 / vision 256x6 (15.8 M); with so few clip arts
    # the data, not the width, limits it. 6,000 steps: ~2 h of a free core, ~200 passes over the clip art.
    "clipart": PretrainConfig(
        image_size=64, patch_size=8, data_weights=(0.5, 0.5), base_tokenizer="weights/default/tokenizer",
        augment=(True, False),  # ~1,900 clip arts are seen hundreds of times in a run: vary them
        steps=6000, warmup_steps=200, eval_every=200,
    ),
}


# ----------------------------------------------------------------------------- model and data


def build_model(cfg: PretrainConfig, tokenizer: CLIPTokenizer) -> CLIPModel:
    """A randomly initialised CLIPModel sized by `cfg`, with token ids that match `tokenizer`."""
    text = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        # CLIPTextConfig defaults to OpenAI's ids 49406/49407; the pooled output is read at eos_token_id
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
        intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def load_splits(data: str | Path, cfg: PretrainConfig) -> tuple[ImageTextPairs, ImageTextPairs]:
    """(train, validation) of a folder or hub dataset (data.loading, the one loader); the held-out split is
    `validation`, else `heldout` (data.clipart's); without either, the last `cfg.val_holdout` train pairs."""
    train = load_pairs(data, cfg.image_size, "train")
    for split in ("validation", "heldout"):
        try:
            val = load_pairs(data, cfg.image_size, split)
        except SplitNotFound:
            continue
        add_shapes_phrasings(data, split, val)
        return train, val
    if len(train) <= cfg.val_holdout:
        raise ValueError(f"{len(train)} training pairs and no validation split: cannot hold out {cfg.val_holdout}.")
    return train.subset(slice(0, -cfg.val_holdout)), train.subset(slice(-cfg.val_holdout, None))


@dataclass
class Sources:
    """Several captioned folders as one training set (their train splits one after another) and their
    validation splits apart; `shares[k]` pairs of every batch come from folder k."""

    names: list[str]
    train: ImageTextPairs
    offsets: list[int]  # where folder k's pairs start in `train`
    sizes: list[int]
    shares: list[int]
    val: dict[str, ImageTextPairs]
    augment: torch.Tensor  # (len(train),) bool: zoom this pair's picture out on white (cfg.augment)
    mirror_ok: torch.Tensor  # (len(train),) bool: no caption of this pair says left or right

    def loaders(self, steps: int, seed: int) -> list[DataLoader]:
        """Per folder with a share: batches of `share` row ids of `train` for `steps` steps, in seeded shuffled
        passes over that folder's own rows (core.loader); a step's rows are one batch of each, concatenated."""
        return [shuffled_loader(range(offset, offset + size), share, steps * share, seed + 1000 * k)
                for k, (offset, size, share) in enumerate(zip(self.offsets, self.sizes, self.shares, strict=True))
                if share]


def load_sources(data: list[str | Path], cfg: PretrainConfig) -> Sources:
    """Every folder's splits (`load_splits`) and the batch shares `cfg.data_weights` asks for."""
    names = [Path(d).name or str(d) for d in data]
    if len(set(names)) != len(names):
        raise ValueError(f"--data folders need distinct names (their scores are reported by name): {names}")
    for field in ("data_weights", "augment"):
        values = getattr(cfg, field)
        if values and len(values) != len(data):
            raise ValueError(f"{field} {values} gives {len(values)} values for {len(data)} --data folders; "
                             f"give one per folder.")
    splits = [load_splits(d, cfg) for d in data]
    sizes = [len(train) for train, _ in splits]
    weights = cfg.data_weights or tuple(sizes)
    exact = [cfg.batch_size * w / sum(weights) for w in weights]
    shares = [math.floor(x) for x in exact]
    for k in sorted(range(len(exact)), key=lambda k: shares[k] - exact[k])[: cfg.batch_size - sum(shares)]:
        shares[k] += 1  # largest remainders first, so the shares add up to the batch size
    train = ImageTextPairs(torch.cat([t.pixels for t, _ in splits]), [x for t, _ in splits for x in t.texts],
                            [x for t, _ in splits for x in t.captions])
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    augment = torch.tensor([bool(cfg.augment and cfg.augment[k]) for k, size in enumerate(sizes) for _ in range(size)])
    mirror_ok = torch.tensor([not any(re.search(r"\b(left|right)\b", c) for c in caps) for caps in train.captions])
    return Sources(names, train, offsets, sizes, shares, {n: v for n, (_, v) in zip(names, splits, strict=True)},
                   augment, mirror_ok)


def add_shapes_phrasings(data_dir: str | Path, split: str, data: ImageTextPairs, draws: int = 512) -> bool:
    """For the procedural shapes set (data/shapes.py), add every phrasing its caption generator can
    produce for each image's ground-truth scene to `data.captions`, which judge retrieval hits.

    Why: a caption without positions ("a small yellow cross") truly describes several of 100 random
    shapes images for 16% of the validation pairs, but the metadata lists only the 3-5 phrasings drawn
    for each image, so a perfect model would score ~0.93 against the listed phrasings alone. The
    generator is random, so its phrasings are collected over `draws` seeds (they cover every choice of
    size words, prefix and relation it makes). Returns False (captions untouched) for other data.
    """
    if not (Path(data_dir) / "shapes_info.json").is_file():
        return False
    config = ShapesConfig()
    table = load_table(data_dir, split)
    try:
        scenes = [Scene(background, [ShapeObject(o["kind"], o["colour"], o["size"], o["row"], o["col"],
                                                 tuple(o["box"])) for o in objects])
                  for background, objects in zip(table["background"], table["objects"], strict=True)]
    except (KeyError, TypeError, ValueError) as err:  # metadata written by another version of data/shapes.py
        print(f"note: {data_dir} does not match data/shapes.py ({err!r}); judging retrieval by listed captions only")
        return False
    for scene, captions in zip(scenes, data.captions, strict=True):
        phrasings = {c for seed in range(draws) for c in captions_for(scene, random.Random(seed), config)}
        captions.extend(sorted(phrasings - set(captions)))
    return True


def pick_captions(data: ImageTextPairs, idx: torch.Tensor, step: int, seed: int) -> list[str]:
    """One phrasing per image, drawn afresh every step (deterministically, for resumes)."""
    g = torch.Generator().manual_seed(seed * 100_003 + 7 * step + 1)
    draws = torch.randint(0, 1 << 30, (len(idx),), generator=g).tolist()
    return [data.captions[i][r % len(data.captions[i])] for i, r in zip(idx.tolist(), draws, strict=True)]


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def retrieval_top1(
    model: CLIPModel, tokenizer: CLIPTokenizer, data: ImageTextPairs, candidates: int = 100, batch_size: int = 250
) -> dict:
    """Text->image and image->text top-1 accuracy among `candidates`.

    The pairs are cut into consecutive groups of `candidates` images with their captions (`texts`).
    Within a group, a caption retrieves the most similar image and an image the most similar caption.
    A hit is a retrieved image that the caption truly describes (the caption is among the image's known
    phrasings), so two images with the same caption do not count against the model; `*_exact` counts
    only the paired item.
    """
    n = len(data) // candidates * candidates
    if n == 0:
        raise ValueError(f"retrieval among {candidates} candidates needs >= {candidates} pairs, got {len(data)}.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    text_emb, image_emb = [], []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        tok = tokenizer(data.texts[start:stop], padding="longest", truncation=True, return_tensors="pt").to(device)
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                    pixel_values=to_pixel_values(data.pixels[start:stop].to(device)))
        text_emb.append(out.text_embeds.float())  # (b, E), unit norm
        image_emb.append(out.image_embeds.float())
    model.train(was_training)
    groups = n // candidates
    text = torch.cat(text_emb).view(groups, candidates, -1)  # (G, C, E)
    image = torch.cat(image_emb).view(groups, candidates, -1)  # (G, C, E)
    sim = text @ image.transpose(1, 2)  # (G, C texts, C images)
    t2i = sim.argmax(dim=2).flatten().tolist()  # per text: the image it retrieved
    i2t = sim.argmax(dim=1).flatten().tolist()  # per image: the text it retrieved
    offsets = [g * candidates for g in range(groups) for _ in range(candidates)]
    t2i_hits = [data.texts[q] in data.captions[o + r] for q, (o, r) in enumerate(zip(offsets, t2i, strict=True))]
    i2t_hits = [data.texts[o + r] in data.captions[q] for q, (o, r) in enumerate(zip(offsets, i2t, strict=True))]
    same = torch.arange(candidates).repeat(groups)
    # chance: the hit rate of a random pick, i.e. the share of a group's images (captions) that would count
    t2i_chance = [sum(data.texts[q] in data.captions[o + j] for j in range(candidates)) / candidates
                  for q, o in enumerate(offsets)]
    i2t_chance = [sum(data.texts[o + j] in data.captions[q] for j in range(candidates)) / candidates
                  for q, o in enumerate(offsets)]
    return {
        "text_to_image_top1": sum(t2i_hits) / n,
        "image_to_text_top1": sum(i2t_hits) / n,
        "text_to_image_top1_exact": (torch.tensor(t2i) == same).float().mean().item(),
        "image_to_text_top1_exact": (torch.tensor(i2t) == same).float().mean().item(),
        "text_to_image_chance": sum(t2i_chance) / n,
        "image_to_text_chance": sum(i2t_chance) / n,
        "pairs": n,
        "candidates": candidates,
    }


def format_scores(scores: dict) -> str:
    return (f"retrieval top-1 among {scores['candidates']} ({scores['pairs']} pairs): "
            f"text->image {scores['text_to_image_top1']:.3f}, image->text {scores['image_to_text_top1']:.3f} "
            f"(exact pair: {scores['text_to_image_top1_exact']:.3f} / {scores['image_to_text_top1_exact']:.3f}; "
            f"chance {scores['text_to_image_chance']:.3f} / {scores['image_to_text_chance']:.3f})")


def retrieval_per_data(model: CLIPModel, tokenizer: CLIPTokenizer, val: dict[str, ImageTextPairs],
                       candidates: int, limit: int | None = None) -> dict[str, dict]:
    """`retrieval_top1` on each folder's validation pairs (the first `limit` of them), by folder name.
    A folder with fewer pairs than `candidates` is scored among all of its pairs."""
    scores = {}
    for name, data in val.items():
        data = data.subset(slice(0, limit))
        scores[name] = retrieval_top1(model, tokenizer, data, min(candidates, len(data)))
    return scores


def format_per_data(scores: dict[str, dict]) -> str:
    return "\n".join(f"  {name}: {format_scores(s)}" for name, s in scores.items())


# ----------------------------------------------------------------------------- training


def make_tokenizer(cfg: PretrainConfig, captions: list[str]) -> CLIPTokenizer:
    """A BPE trained on `captions`, or `cfg.base_tokenizer` grown with whole-word tokens for their common words."""
    if not cfg.base_tokenizer:
        return train_clip_bpe(captions, vocab_size=cfg.vocab_size, model_max_length=cfg.max_length)
    base = CLIPTokenizer.from_pretrained(cfg.base_tokenizer)
    tokenizer, added = grow_tokenizer(base, captions, min_count=cfg.min_word_count)
    tokenizer.model_max_length = cfg.max_length
    print(f"tokenizer: {cfg.base_tokenizer} ({len(base)} tokens) + {len(added)} whole words used >= "
          f"{cfg.min_word_count} times = {len(tokenizer)} tokens")
    return tokenizer


def train(cfg: PretrainConfig, data: str | Path | list[str | Path], out: str | Path, resume: bool = False,
          cpu: bool = False) -> dict:
    """Train (or resume) a small CLIP on one or several captioned folders and export it to `out`; returns the
    final retrieval scores of the first folder, with every folder's under "per_data"."""
    out = Path(out)
    data = [data] if isinstance(data, str | Path) else list(data)
    # split_batches: --batch-size is the global batch; each process takes its slice of every folder's share
    accelerator = Accelerator(mixed_precision=mixed_precision(cpu), cpu=cpu,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    sources = load_sources(data, cfg)
    train_set = sources.train
    if resume:
        tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")  # the ids the checkpoint was trained with
    else:
        tokenizer = make_tokenizer(cfg, [c for caps in train_set.captions for c in caps])
        if accelerator.is_main_process:
            save_clip_tokenizer(tokenizer, out / "tokenizer")
    if accelerator.is_main_process:  # (again on resume: --steps may have changed)
        (out / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    _report_long_captions(tokenizer, train_set, cfg.max_length)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [  # nanoGPT's rule: decay matrices and embeddings, not biases, norms or the logit scale
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)  # CLIP's betas/eps
    start_step, elapsed = 0, 0.0
    if resume:
        start_step, elapsed, path = _resume(out, model, optimizer)
        accelerator.print(f"resumed from {path} (step {start_step})")
    # Not prepared by accelerate: its scheduler wrapper steps once per process on each optimizer step.
    scheduler = lr_schedule(optimizer, cfg.warmup_steps, cfg.steps, done=start_step)
    model, optimizer = accelerator.prepare(model, optimizer)
    loaders = [accelerator.prepare_data_loader(dl, device_placement=False)
               for dl in sources.loaders(cfg.steps, cfg.seed)]
    if start_step:  # read on from where the checkpoint's run stopped
        loaders = [accelerator.skip_first_batches(dl, start_step) for dl in loaders]

    shares = ", ".join(f"{n} {size} train / {len(sources.val[n])} validation, {share} a batch"
                       for n, size, share in zip(sources.names, sources.sizes, sources.shares, strict=True))
    accelerator.print(f"{sum(p.numel() for p in params) / 1e6:.2f} M parameters, vocab {len(tokenizer)}, {shares}; "
                      f"mixed precision {accelerator.mixed_precision}, steps {start_step}->{cfg.steps}")
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, mininterval=5,
               disable=not accelerator.is_local_main_process)
    for step, parts in zip(bar, zip(*loaders, strict=True), strict=True):
        idx = torch.cat(parts)  # (b,) rows of sources.train: this process' slice of each folder's share
        loss = _train_step(model, optimizer, scheduler, accelerator, tokenizer, sources, idx, step, cfg)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        done = step + 1
        record = {"step": done, "loss": loss, "seconds": round(time.perf_counter() - t0, 1)}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            per_data = retrieval_per_data(accelerator.unwrap_model(model), tokenizer, sources.val, cfg.candidates,
                                          cfg.eval_size)
            record.update(per_data[sources.names[0]], per_data=per_data)
            bar.write(f"step {done}: loss {loss:.3f}\n" + format_per_data(per_data))
        if accelerator.is_main_process and (done % cfg.eval_every == 0 or done % 50 == 0):
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if accelerator.is_main_process and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            state = {"step": done, "seconds": time.perf_counter() - t0, "config": dataclasses.asdict(cfg)}
            opt_tensors, state["optimizer"] = optimizer_tensors(optimizer)
            save_checkpoint(out / "checkpoints", done, {"model": accelerator.unwrap_model(model).state_dict(),
                                                         "optimizer": opt_tensors}, state, cfg.keep_checkpoints)
    train_seconds = time.perf_counter() - t0

    clip = accelerator.unwrap_model(model)
    per_data = retrieval_per_data(clip, tokenizer, sources.val, cfg.candidates)
    accelerator.print("final (all validation pairs):\n" + format_per_data(per_data))
    scores = {**per_data[sources.names[0]], "per_data": per_data}
    if accelerator.is_main_process:
        export(clip, tokenizer, cfg, out, scores, train_seconds, [str(d) for d in data])
    return scores


def _train_step(model, optimizer, scheduler, accelerator, tokenizer, sources, idx, step, cfg) -> float:
    """One contrastive step on the examples `idx` of `sources.train`; returns the loss."""
    data = sources.train
    captions = pick_captions(data, idx, step, cfg.seed)
    tok = tokenizer(captions, padding="longest", truncation=True, max_length=cfg.max_length, return_tensors="pt")
    pixels = data.pixels[idx]  # (b, 3, S, S) uint8
    vary = sources.augment[idx]
    if vary.any():  # seeded by step (and process), so a resumed run sees the same pictures
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + 7 * step + 2 + 1_000_000 * accelerator.process_index)
        pixels = pixels.clone()
        pixels[vary] = zoom_out_on_white(pixels[vary], g, cfg.augment_min_scale, sources.mirror_ok[idx][vary])
    pixel_values = to_pixel_values(pixels.to(accelerator.device))  # (b, 3, S, S)
    out = model(input_ids=tok["input_ids"].to(accelerator.device),
                attention_mask=tok["attention_mask"].to(accelerator.device),
                pixel_values=pixel_values, return_loss=True)
    accelerator.backward(out.loss)
    if cfg.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP clamps the learned temperature at 100 so the logits cannot blow up
        accelerator.unwrap_model(model).logit_scale.clamp_(0, math.log(100))
    return out.loss.item()


def _report_long_captions(tokenizer: CLIPTokenizer, data: ImageTextPairs, max_length: int) -> None:
    lengths = [len(ids) for ids in tokenizer([c for caps in data.captions for c in caps], verbose=False)["input_ids"]]
    cut = sum(n > max_length for n in lengths)
    if cut:
        print(f"warning: {cut} of {len(lengths)} captions are longer than max_length={max_length} tokens "
              f"(longest {max(lengths)}) and get truncated; raise max_length in the config.")


def _accelerate_checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders of the older format (accelerate save_state, finished with progress.json)."""
    return sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "progress.json").is_file())


def _resume(out: Path, model: CLIPModel, optimizer: torch.optim.Optimizer) -> tuple[int, float, Path]:
    """Load the newest checkpoint's weights and optimizer state; returns (step, training seconds so far, folder)."""
    found = checkpoints(out / "checkpoints")
    if not found and _accelerate_checkpoints(out):
        raise ValueError(f"{out / 'checkpoints'} holds checkpoints of an older pretrain_clip (accelerate save_state, "
                         "with pickled optimizer and RNG states), which this version does not resume: start a new "
                         "--out (the exported clip/ and text_encoder/ there still load).")
    if not found:
        raise ValueError(f"--resume: no checkpoints/step_NNNNNN folder in {out}; start without --resume.")
    step, path = found[-1]
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    state = json.loads((path / "state.json").read_text())
    load_optimizer(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
    return step, float(state["seconds"]), path


# ----------------------------------------------------------------------------- export


def export(clip: CLIPModel, tokenizer: CLIPTokenizer, cfg: PretrainConfig, out: Path, scores: dict,
           train_seconds: float, data: list[str]) -> None:
    """Write clip/, text_encoder/ + tokenizer/, retrieval.json and the model card into `out`."""
    clip = clip.float().eval()
    clip.save_pretrained(out / "clip", safe_serialization=True)
    save_clip_tokenizer(tokenizer, out / "clip")
    CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    ).save_pretrained(out / "clip")
    # the text half, through the same loader users' CLIP checkpoints go through (it checks no weight is missing)
    TextEncoder.from_pretrained(str(out / "clip")).save_pretrained(out)
    config_json = json.dumps(dataclasses.asdict(cfg), indent=2)
    for folder in (out, out / "clip", out / "text_encoder"):
        (folder / "pretrain_config.json").write_text(config_json)
    result = {**scores, "train_seconds": round(train_seconds, 1), "steps": cfg.steps, "data": data}
    (out / "retrieval.json").write_text(json.dumps(result, indent=2))
    (out / "README.md").write_text(model_card(cfg, result, sum(p.numel() for p in clip.parameters()),
                                              len(tokenizer)))


def model_card(cfg: PretrainConfig, result: dict, n_params: int, vocab: int) -> str:
    data = result["data"] if isinstance(result["data"], list) else [result["data"]]  # older runs: one folder
    per_data = result.get("per_data") or {Path(data[0]).name: result}
    rows = "\n".join(
        f"| {name} | {s['pairs']} | {s['candidates']} | {s['text_to_image_top1']:.3f} | {s['image_to_text_top1']:.3f} "
        f"| {s['text_to_image_top1_exact']:.3f} / {s['image_to_text_top1_exact']:.3f} "
        f"| {s.get('text_to_image_chance', 1 / s['candidates']):.3f} / "
        f"{s.get('image_to_text_chance', 1 / s['candidates']):.3f} |"
        for name, s in per_data.items())
    tokenizer = (f"the tokenizer `{cfg.base_tokenizer}` grown with a whole-word token for every caption word used "
                 f"at least {cfg.min_word_count} times (its old ids kept)" if cfg.base_tokenizer else
                 "a BPE tokenizer trained on the same captions")
    weights = (f"; each batch {', '.join(f'{w:g}' for w in cfg.data_weights)} from the folders in that order"
               if cfg.data_weights else "")
    folders = ", ".join(f"`{d}`" for d in data)
    passed = min(result["text_to_image_top1"], result["image_to_text_top1"]) >= 0.90
    return f"""# Small CLIP trained on captioned pictures

A `transformers.CLIPModel` ({n_params / 1e6:.1f} M parameters; text tower {cfg.text_layers} layers x
{cfg.text_width}, ViT image tower {cfg.vision_layers} layers x {cfg.vision_width} on {cfg.image_size} px in
{cfg.patch_size} px patches) trained contrastively (symmetric InfoNCE) from scratch on {folders}{weights},
with {tokenizer}, in CLIP's vocab.json/merges.txt format ({vocab} tokens, max {cfg.max_length} per prompt;
characters outside printable ASCII and the captions map to `<|unk|>`).
It knows only the words of its captions: words never seen in them carry no meaning for it.

Validation retrieval, top-1 among the candidates (each folder's own validation pairs, cut into groups):

| data | pairs | candidates | text -> image | image -> text | exact pair only (t->i / i->t) | chance (t->i / i->t) |
|---|---|---|---|---|---|---|
{rows}

Quality bar on the first folder (>= 0.90 both ways): {"met" if passed else "NOT met"}. A hit is a retrieved image that
the caption truly describes, or a retrieved caption that truly describes the image: the caption is one of the
image's phrasings (for the shapes set, any phrasing its generator can produce for the image's ground
truth; about 16% of its captions, e.g. "a small yellow cross", fit more than one of 100 images).
"Exact pair" counts only the item the caption was written for; "chance" is the hit rate of a random pick
(above 1/candidates where several images share a caption, such as "a dog").
Training: {result['steps']} steps of {cfg.batch_size} pairs, {result['train_seconds'] / 60:.0f} min.
Reproduce the score: `python pretrain_clip.py --data {" ".join(data)} --eval <this folder>`.
Layout: `clip/` (full CLIPModel), `text_encoder/` + `tokenizer/` (what the diffusion pipeline loads).
"""


def evaluate(model_dir: str | Path, data: str | Path | list[str | Path], candidates: int,
             update_card: bool = False) -> dict:
    """Print and return the retrieval scores of a saved CLIP (`<out>` or `<out>/clip`) on the validation splits
    of `data` (the first folder's scores, with every folder's under "per_data").

    With `update_card`, the scores replace those in `<out>/retrieval.json` and the model card `<out>/README.md`.
    """
    data = [data] if isinstance(data, str | Path) else list(data)
    model_dir = Path(model_dir)
    clip_dir = model_dir / "clip" if (model_dir / "clip" / "config.json").is_file() else model_dir
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    config_file = clip_dir / "pretrain_config.json"
    cfg = _config_from_json(config_file) if config_file.is_file() else PretrainConfig()
    cfg.image_size = model.config.vision_config.image_size
    cfg.data_weights, cfg.augment = (), ()  # only the validation splits are read
    per_data = retrieval_per_data(model, tokenizer, load_sources(data, cfg).val, candidates)
    print(f"{clip_dir}:\n" + format_per_data(per_data))
    scores = {**per_data[next(iter(per_data))], "per_data": per_data}
    if update_card:
        out = clip_dir.parent
        if not (out / "retrieval.json").is_file():
            raise ValueError(f"--update-card: {out} has no retrieval.json; point --eval at a pretrain_clip --out.")
        result = {**json.loads((out / "retrieval.json").read_text()), **scores}
        (out / "retrieval.json").write_text(json.dumps(result, indent=2))
        (out / "README.md").write_text(model_card(cfg, result, sum(p.numel() for p in model.parameters()),
                                                  len(tokenizer)))
    return scores


def _config_from_json(path: Path) -> PretrainConfig:
    """A saved config (JSON turns tuples into lists; configs from before a field existed get its default)."""
    fields = json.loads(path.read_text())
    for field in ("data_weights", "augment"):
        if field in fields:
            fields[field] = tuple(fields[field])
    return PretrainConfig(**fields)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, nargs="+",
                   help="captioned image folder(s) (imagefolder layout); several train one model together")
    p.add_argument("--tokenizer", help="a CLIP tokenizer folder to grow with the captions' words (old ids kept) "
                                       "instead of training a BPE; overrides the preset's")
    p.add_argument("--out", help="output folder for the model, tokenizer and checkpoints")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--steps", type=int, help="override the preset's number of steps (e.g. to extend a run)")
    p.add_argument("--batch-size", type=int, help="override the preset's batch size")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--eval", metavar="DIR", help="only print the retrieval score of a saved model")
    p.add_argument("--candidates", type=int, default=100, help="retrieval candidates for --eval")
    p.add_argument("--update-card", action="store_true", help="with --eval: write the scores into the model card")
    args = p.parse_args(argv)
    if args.eval:
        evaluate(args.eval, args.data, args.candidates, args.update_card)
        return
    if not args.out:
        p.error("--out is required for training")
    out = Path(args.out)
    if args.resume:  # the run's own config, so a resumed run cannot silently change shape
        cfg = _config_from_json(out / "pretrain_config.json")
    else:
        cfg = dataclasses.replace(PRESETS[args.preset])
        cfg.base_tokenizer = args.tokenizer if args.tokenizer is not None else cfg.base_tokenizer
    cfg.steps = args.steps or cfg.steps
    cfg.batch_size = args.batch_size or cfg.batch_size
    if not args.resume and (checkpoints(out / "checkpoints") or _accelerate_checkpoints(out)):
        p.error(f"{out} already has checkpoints: pass --resume to continue, or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    train(cfg, args.data, out, resume=args.resume, cpu=args.cpu)


if __name__ == "__main__":
    main()
