"""Train or fine-tune the text-to-image U-Net with accelerate.

    # from scratch on the procedural shapes (generated into cache/ on first use), shipped text encoder
    accelerate launch train.py --data shapes --caption-column captions --out runs/default --steps 8000
    #   --grounding-weight 0.01: also teach each colour/shape word's cross-attention to look at its object
    #   (the shapes set's masks; diffusion/grounding.py) -- the recipe of the shipped default
    # fine-tune the shipped model on your own captioned images (imagefolder: images + metadata.jsonl)
    accelerate launch train.py --init weights/default --data my_images --out runs/mine --steps 500 --lr 1e-4
    # two CPU processes (gloo), the same script
    torchrun --nproc_per_node 2 train.py --cpu --data cache/shapes --out runs/ddp --steps 100

`python train.py ...` works too (one process). A run writes, under --out:
    checkpoints/step_000500/   model, EMA, optimizer (safetensors) + state.json; the newest K kept (core/checkpoints.py)
    metrics.jsonl              one line a step: loss, lr, images/s (and the grounding terms)
    samples/step_000500.png    validation prompts sampled with the EMA weights
    logs/                      TensorBoard (loss, lr, images/s, validation grids) when tensorboard is installed
    pipeline/                  the final export (EMA weights, U-Net stored in fp16), loadable by TextToImagePipeline
`--export-only` writes pipeline/ from the newest checkpoint instead (e.g. while a run is still going);
`--export-only --export-step 500` writes pipeline_step_000500/ from that step's checkpoint.
--push-to-hub OWNER/NAME uploads the export to the Hugging Face Hub (needs network and a token).
Re-running the same command resumes from the newest checkpoint, exactly: the batches are a seeded torch
DataLoader that accelerate shards across processes and, on resume, skips to the step (core/loader.py); every
other random draw of step s (caption choice and dropout, noise, timesteps) is seeded from (seed, s, rank); the
learning rate (warmup, then cosine to 10% of the peak) is transformers' schedule, rebuilt from the step.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from conditioning.text_encoder import TEXT_TRAINING, TextEncoder
from conditioning.tokenizer import save_clip_tokenizer
from core.checkpoints import (
    CheckpointWriteError,
    checkpoints,
    load_optimizer,
    lr_schedule,
    optimizer_tensors,
    save_checkpoint,
)
from core.loader import shuffled_loader
from core.precision import DTYPES, cpu_name, mixed_precision
from data.loading import LoadConfig, load_captioned
from diffusion.grammar import NAME as SHAPES
from diffusion.grounding import GroundingRecorder, grounding_loss, relation_loss, relation_pairs, token_targets
from diffusion.pipeline import TextToImagePipeline
from diffusion.vocabulary import CAPTIONS_FILE, CaptionSummary
from unet import UNet, UNetConfig

EXPORT_DTYPES = ("fp16", "fp32")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint and in the exported model card."""

    data: str = "shapes"                  # "shapes[:N]" (generated), a captioned image folder, or a hub dataset id
    out: str = "runs/default"
    init: str | None = None               # pipeline folder to fine-tune (e.g. weights/default)
    text_encoder: str = "weights/default"  # from scratch: pipeline folder or CLIP checkpoint to condition on
    preset: str = "cpu"                   # U-Net preset when training from scratch
    context_layers: int | None = None     # bidirectional text layers in the U-Net; None: the preset's / --init's
    position_embedding: bool | None = None  # add one where the U-Net has none (--init too); None: keep as is
    image_column: str = "image"
    caption_column: str = "text"
    # None below: picked by `resolve_auto` -- the shapes recipe's values when training from scratch, and
    # values that fit the folder's size when fine-tuning (--init) on someone's own pictures.
    resolution: int | None = None         # None: the preset's sample size, or --init's up to 32 px (fine_tune_size)
    batch_size: int | None = None
    grad_accum: int = 1
    steps: int | None = None
    lr: float | None = None               # the U-Net's peak learning rate
    warmup: int | None = None
    text_encoder_training: str = "auto"   # frozen | embeddings | full | auto (embeddings: fine-tuning our CLIP)
    text_lr: float | None = None          # the text encoder's peak learning rate (its transformer)
    embedding_lr: float | None = None     # the token embeddings' peak learning rate (new words start untrained)
    grow_tokenizer: bool | None = None    # make the captions' words whole tokens; None: when the text side trains
    min_word_count: int = 1               # words used fewer times in the captions stay split into pieces
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"         # auto (bf16 where the CPU/GPU runs it fast) | no | bf16 | fp16
    ema_decay: float = 0.999
    caption_dropout: float = 0.1          # empty prompts, for classifier-free guidance
    prediction_type: str = "v_prediction"  # or "epsilon"
    snr_gamma: float = 5.0                # Min-SNR weighting; 0 turns it off
    snr_floor: float = 0.0                # least Min-SNR weight of a noisy step (v-prediction gives the noisiest ~0)
    grounding_weight: float = 0.0         # token grounding loss on cross-attention (needs object masks: shapes)
    grounding_pixel_weight: float = 0.05  # the pixel (BCE) term, relative to the token term
    ground_positions: bool = False        # also ground position words ("top", "left" …) in the object placed there
    ground_relations: bool = False        # also ground relation words ("above", "left of") in the object they place
    relation_weight: float = 0.0          # pair loss: in "A above B", A's word maps sit above B's (captions only)
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    validate_every: int | None = None
    validation_steps: int = 20            # sampling steps for the validation grid
    validation_prompts: tuple[str, ...] | None = None  # None: a few of the data's own captions, seen and recombined
    seed: int = 0
    cpu: bool = False
    push_to_hub: str | None = None        # OWNER/NAME on the Hugging Face Hub
    export_dtype: str = "fp16"            # precision the exported U-Net weights are stored in: fp16 | fp32
    export_only: bool = False             # write OUT/pipeline from the newest checkpoint's EMA weights, no training
    export_step: int | None = None        # with export_only: that step's checkpoint instead, to OUT/pipeline_step_N

    def __post_init__(self):
        if self.validation_prompts is not None:
            self.validation_prompts = tuple(self.validation_prompts)
        if self.text_encoder_training not in ("auto", *TEXT_TRAINING):
            raise ValueError(f"text_encoder_training {self.text_encoder_training!r}: choose auto, "
                             f"{', '.join(TEXT_TRAINING)}.")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r}: choose epsilon or v_prediction.")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: choose auto, no, bf16 or fp16.")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype {self.export_dtype!r}: choose {' or '.join(EXPORT_DTYPES)}.")
        if min(self.grounding_weight, self.grounding_pixel_weight, self.relation_weight) < 0:
            raise ValueError("grounding_weight, grounding_pixel_weight and relation_weight must be >= 0.")
        if not 0 <= self.snr_floor <= 0.5:
            raise ValueError(f"snr_floor={self.snr_floor}: must be a loss weight in [0, 0.5] (0: plain Min-SNR; "
                             "0.5 is v-prediction's weight at SNR 1, where the floor starts).")
        if (self.ground_positions or self.ground_relations) and not self.grounding_weight > 0:
            raise ValueError("--ground-positions and --ground-relations ground words with the grounding loss: "
                             "also give --grounding-weight (0.05 is the shipped model's last stage's).")
        if min(v for v in (self.batch_size, self.grad_accum, self.steps, self.min_word_count) if v is not None) < 1:
            raise ValueError("batch_size, grad_accum, steps and min_word_count must be at least 1.")
        if self.export_step is not None and not self.export_only:
            raise ValueError("--export-step names the checkpoint --export-only writes: give --export-only too.")


# -- small pure pieces ------------------------------------------------------------------------------
def resolve_precision(cfg: TrainConfig) -> str:
    return mixed_precision(cfg.cpu) if cfg.mixed_precision == "auto" else cfg.mixed_precision


def step_seed(cfg: TrainConfig, step: int, rank: int) -> int:
    return (cfg.seed * 1_000_003 + step) * 64 + rank


def diffusion_loss(unet, noise_scheduler: DDPMScheduler, x0, context, mask, cfg: TrainConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """Denoising loss at random timesteps; target noise (epsilon) or velocity (v), Min-SNR weighted."""
    B = x0.shape[0]
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (B,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = noise_scheduler.add_noise(x0, noise, t)
    target = noise if cfg.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
    pred = unet(x_t, t, context, mask)
    mse = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))  # (B,)
    if cfg.snr_gamma > 0:
        mse = mse * snr_weights(noise_scheduler, t, cfg)
    return mse.mean()


def snr_weights(noise_scheduler: DDPMScheduler, t: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), which cap the weight of easy, low-noise steps:
    min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v. The latter falls to ~0 at the noisiest
    steps, the ones that decide the layout; cfg.snr_floor is the least weight of a noisy step (SNR < 1,
    where v's weight is under 0.5), so they stay trained. Easy steps keep their cap."""
    snr = compute_snr(noise_scheduler, t)
    base = snr if cfg.prediction_type == "epsilon" else snr + 1
    weights = torch.clamp(snr, max=cfg.snr_gamma) / base
    return torch.where(snr < 1, weights.clamp_min(cfg.snr_floor), weights)


# -- building the run ---------------------------------------------------------------------------------
def build(cfg: TrainConfig) -> tuple[UNet, TextEncoder, DDPMScheduler]:
    """The U-Net (fresh or from --init), the frozen text encoder, and the training noise schedule."""
    if cfg.init is not None:
        pipe = TextToImagePipeline.from_pretrained(cfg.init, dtype="fp32")  # trained in fp32 (+ autocast)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler_config)
        if noise_scheduler.config.prediction_type != cfg.prediction_type:
            raise ValueError(
                f"{cfg.init} was trained with prediction_type={noise_scheduler.config.prediction_type}; "
                f"fine-tune it with --prediction-type {noise_scheduler.config.prediction_type}."
            )
        unet = pipe.unet.grow(cfg.context_layers, cfg.position_embedding).train()  # at its own size: see train()
        return unet, pipe.text_encoder, noise_scheduler
    text_encoder = TextEncoder.from_pretrained(cfg.text_encoder)
    size = {"sample_size": cfg.resolution} if cfg.resolution else {}
    config = UNetConfig.preset(cfg.preset, context_dim=text_encoder.hidden_size, **size)
    unet = UNet(config).grow(cfg.context_layers, cfg.position_embedding)
    noise_scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=cfg.prediction_type,
                                    clip_sample=False)
    return unet, text_encoder, noise_scheduler


def check_resolution(unet: UNet, resolution: int) -> None:
    f = unet.config.downsample_factor
    if resolution % f:
        raise ValueError(f"--resolution {resolution} is not divisible by {f}, which this U-Net needs; "
                         f"use e.g. {round(resolution / f) * f}.")


FINE_TUNE_SIZE = 32


def fine_tune_size(config: UNetConfig) -> int:
    """The size a fine-tune runs at unless --resolution says: the base's own, at most FINE_TUNE_SIZE px. Measured on
    98 Tux Paint stamps from the clip-art model when it was 64 px, the one line's 800 steps of 32 on 2 CPU cores:
    retrieval top-1 0.76 at 32 px in 4 min 49 s, 0.30 at 64 px in 11 min 5 s (a step is 2.3x faster, learns more)."""
    size, fits = config.sample_size, FINE_TUNE_SIZE % config.downsample_factor == 0
    return FINE_TUNE_SIZE if size > FINE_TUNE_SIZE and fits else size


def at_resolution(unet: UNet, size: int) -> UNet:
    """The same U-Net (weights and architecture), sampling at `size` px by default: the levels with
    attention, fixed when it was built through attention_resolution, stay the same."""
    check_resolution(unet, size)
    c = unet.config
    levels = [level for level in range(len(c.channel_mults)) if c.level_has_attention(level)]
    resized = UNet(replace(c, sample_size=size, attention_resolution=size // 2 ** min(levels) if levels else 0))
    resized.load_state_dict(unet.state_dict())  # strict: nothing was added or reshaped
    return resized.train(unet.training)


def resolve_data(cfg: TrainConfig) -> str:
    """"shapes" or "shapes:N" → generate N (default 50,000) training images once into cache/; else as given."""
    if not (cfg.data == "shapes" or cfg.data.startswith("shapes:")):
        return cfg.data
    from data.shapes import ShapesConfig, generate_dataset

    n = int(cfg.data.split(":", 1)[1]) if ":" in cfg.data else 50_000
    size = max(cfg.resolution, 32)  # drawn at >= 32 px and resized by the loader
    out = Path("cache") / f"shapes_{size}px_seed{cfg.seed}_{n}"
    counts = {"train": n, "validation": 1000, "test": 1000, "heldout": 1000}
    return str(generate_dataset(out, ShapesConfig(size=size, seed=cfg.seed), counts=counts))


def collate(items: list[dict]) -> tuple[torch.Tensor, list[list[str]], list[dict]]:
    """Images (B, 3, R, R), each image's phrasings (the step picks one), and the items (object masks and words
    when the loader gives them)."""
    return torch.stack([it["pixel_values"] for it in items]), [it["captions"] for it in items], items


def write_extra(tokenizer: CLIPTokenizer | None, captions: CaptionSummary | None, folder: Path) -> None:
    """Beside a checkpoint's tensors: a grown tokenizer (tokenizer/, in CLIP's format) and the captions' summary
    (captions.json), so --export-only writes the same pipeline folder the run's end does."""
    if tokenizer is not None:
        save_clip_tokenizer(tokenizer, folder / "tokenizer")
    if captions is not None:
        captions.save(folder)


def validation_grid(pipe: TextToImagePipeline, prompts: tuple[str, ...], seed: int, steps: int, path: Path):
    """One row per prompt, four samples each, scaled up 4× so 32 px samples can be seen."""
    from PIL import Image

    result = pipe(list(prompts), num_images=4, steps=steps, seed=seed)
    w, h = result.images[0].size
    grid = Image.new("RGB", (4 * w, len(prompts) * h))
    for i, im in enumerate(result.images):
        grid.paste(im, ((i % 4) * w, (i // 4) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST)
    grid.save(path)
    return grid


def model_card(cfg: TrainConfig, unet: UNet, step: int, seconds: float, precision: str, hardware: str,
               loss: float) -> str:
    return (
        "---\nlibrary_name: look-inside-diffusion\ntags: [text-to-image, diffusion, attention-maps]\n---\n\n"
        "# Text-to-image U-Net with recorded attention\n\n"
        f"Trained with `train.py` for {step} steps ({seconds / 3600:.2f} h on {hardware}, precision {precision}); "
        f"final training loss {loss:.4f}. U-Net: {unet.num_parameters() / 1e6:.2f} M parameters.\n\n"
        f"## Training config\n\n```json\n{json.dumps(asdict(cfg), indent=2)}\n```\n\n"
        f"## U-Net config\n\n```json\n{json.dumps(asdict(unet.config), indent=2)}\n```\n"
    )


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU ({cpu_name()})"


def export(unet: UNet, text_encoder: TextEncoder, noise_scheduler: DDPMScheduler, cfg: TrainConfig, step: int,
           seconds: float, precision: str, hardware_name: str, loss: float, name: str = "pipeline",
           captions: CaptionSummary | None = None) -> Path:
    """Write OUT/<name>: the given (EMA) U-Net, the text encoder, the noise schedule, a model card and the
    summary of the captions it learned (what the app shows as what the model knows)."""
    dest = Path(cfg.out) / name
    card = model_card(cfg, unet, step, seconds, precision, hardware_name, loss)
    pipe = TextToImagePipeline(unet.eval(), text_encoder, dict(noise_scheduler.config), card, captions=captions)
    pipe.save_pretrained(dest, unet_dtype=DTYPES[cfg.export_dtype])
    (dest / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return dest


def export_checkpoint(cfg: TrainConfig) -> Path:
    """Export a checkpoint under cfg.out (its EMA weights): the newest to OUT/pipeline (e.g. of a run that is
    still going), or the one at cfg.export_step to OUT/pipeline_step_N (to evaluate a run's checkpoints)."""
    root = Path(cfg.out) / "checkpoints"
    found = checkpoints(root)
    if not found:
        raise FileNotFoundError(f"no finished checkpoint under {root}: nothing to export.")
    if cfg.export_step is None:
        (step, path), name = found[-1], "pipeline"
    else:
        by_step = dict(found)
        if cfg.export_step not in by_step:
            raise FileNotFoundError(f"no finished checkpoint at step {cfg.export_step} under {root}; it has steps "
                                    f"{', '.join(str(s) for s in by_step)} (--keep-checkpoints keeps the newest K).")
        step, path = cfg.export_step, by_step[cfg.export_step]
        name = f"pipeline_{path.name}"  # pipeline_step_000500: the checkpoint folder's own name
    state = json.loads((path / "state.json").read_text())
    run = TrainConfig(**{**state["config"], "out": cfg.out, "export_dtype": cfg.export_dtype, "export_only": False,
                         "export_step": None})
    unet, text_encoder, noise_scheduler = build(run)
    if (path / "tokenizer").is_dir():  # the run grew the tokenizer: its embedding table has those rows
        text_encoder.use_tokenizer(CLIPTokenizer.from_pretrained(path / "tokenizer"))
    params = [p for p in unet.parameters() if p.requires_grad] + text_encoder.set_trainable(run.text_encoder_training)
    shadow = load_file(path / "ema.safetensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(shadow[str(i)])
    captions = CaptionSummary.load(path) if (path / CAPTIONS_FILE).is_file() else None
    return export(unet, text_encoder, noise_scheduler, run, step, state["seconds"], resolve_precision(run),
                  state.get("hardware", "unknown hardware"), state["loss"], name, captions)


# -- settings that fit the data ----------------------------------------------------------------------
SHAPES_PROMPTS = ("a red circle", "a blue square above a yellow triangle", "two green circles")
OPENAI_CLIP_VOCAB = 49_408  # a CLIP with OpenAI's vocabulary already reads English: keep it frozen


def all_captions(dataset, column: str) -> list[str]:
    """Every caption of the dataset (each phrasing, where a row lists several)."""
    out = []
    for row in dataset.rows:
        value = dataset.hf[row][column]
        out.extend([value] if isinstance(value, str) else value)
    return out


def is_shapes(cfg: TrainConfig) -> bool:
    return cfg.data == "shapes" or cfg.data.startswith("shapes:")


def resolve_auto(cfg: TrainConfig, n_images: int, captions: list[str], text_encoder: TextEncoder) -> TrainConfig:
    """Fill in every setting left at None/"auto".

    From scratch: the shapes recipe (batch 64, 8,000 steps, lr 1e-3). Fine-tuning (--init) on a folder of
    N pictures: steps ~ 800·sqrt(N/100) at batch 32 (256 passes over 100 pictures, ~95 over 750: about 10
    and 25 min on 2 CPU cores), lr 2e-3 (measured on 100 Tux Paint stamps, 600 steps: retrieval top-1
    0.31 at 5e-4, 0.49 at 1e-3, 0.51 at 2e-3). The text side learns the captions' words through its token
    embeddings (800 steps at 2e-3: top-1 0.76 training the embeddings only, 0.62 training the whole text
    encoder, 0.59 whole without growing the tokenizer); a CLIP that already reads English stays frozen, and
    so does the CLIP a U-Net is trained on from scratch (it was trained for those captions).
    """
    fine_tune = cfg.init is not None
    if fine_tune:
        batch = cfg.batch_size or (32 if n_images >= 64 else 16)
        steps = cfg.steps or int(min(3000, max(200, round(800 * math.sqrt(n_images / 100) / 50) * 50)))
        lr, warmup = cfg.lr or 2e-3, cfg.warmup if cfg.warmup is not None else min(100, steps // 10)
    else:
        batch, steps = cfg.batch_size or 64, cfg.steps or 8_000
        lr, warmup = cfg.lr or 1e-3, cfg.warmup if cfg.warmup is not None else 500
    mode = cfg.text_encoder_training
    if mode == "auto":
        knows_english = len(text_encoder.tokenizer) >= OPENAI_CLIP_VOCAB
        mode = "frozen" if not fine_tune or is_shapes(cfg) or knows_english else "embeddings"
    prompts = cfg.validation_prompts or (SHAPES_PROMPTS if is_shapes(cfg) else validation_prompts(captions))
    return replace(
        cfg, batch_size=batch, steps=steps, lr=lr, warmup=warmup, text_encoder_training=mode,
        text_lr=cfg.text_lr or lr / 5, embedding_lr=cfg.embedding_lr or lr * 5,
        grow_tokenizer=cfg.grow_tokenizer if cfg.grow_tokenizer is not None else mode != "frozen",
        checkpoint_every=cfg.checkpoint_every or (max(50, steps // 4) if fine_tune else 500),
        validate_every=cfg.validate_every or (max(50, steps // 2) if fine_tune else 1000),
        validation_prompts=tuple(prompts))


def validation_prompts(captions: list[str], seen: int = 4, recombined: int = 2) -> list[str]:
    """A few captions of the data (spread through it), and a few recombined from two of them: the modifiers
    of one short caption on the noun of another ("a yellow lemon" + "a red kangaroo" -> "a yellow kangaroo")."""
    unique = list(dict.fromkeys(c.strip() for c in captions if c.strip()))
    picked = unique[:: max(1, len(unique) // seen)][:seen]
    short = [c.split() for c in unique if 3 <= len(c.split()) <= 4 and c.split()[0].lower() in ("a", "an")]
    mixed = []
    for a, b in zip(short[::2], short[1::2], strict=False):
        if len(mixed) == recombined:
            break
        modifiers, noun = a[1:-1], b[-1]
        if noun.lower() != a[-1].lower():
            mixed.append(" ".join(["an" if modifiers[0][0].lower() in "aeiou" else "a", *modifiers, noun]))
    return picked + mixed


def describe_run(cfg: TrainConfig, dataset, captions: list[str]) -> str:
    """What the run will do, said once at the start (so a person knows what the defaults chose)."""
    sizes = Counter(image_size(dataset.hf[r][cfg.image_column]) for r in dataset.rows[:200])
    sizes.pop(None, None)
    seen = "pictures of " + ", ".join(f"{w}x{h}" for (w, h), _ in sizes.most_common(3)) + " px" if sizes else "pictures"
    resize = "used at" if set(sizes) == {(cfg.resolution, cfg.resolution)} else "resized to"
    return (f"{len(dataset)} {seen}, {resize} {cfg.resolution} px; {len(set(captions))} distinct captions. "
            f"{cfg.steps} steps of {cfg.batch_size} at lr {cfg.lr:g} (warmup {cfg.warmup}); text encoder: "
            f"{cfg.text_encoder_training}" + (f" (lr {cfg.text_lr:g}, embeddings {cfg.embedding_lr:g})"
                                              if cfg.text_encoder_training != "frozen" else "")
            + f"; checkpoints every {cfg.checkpoint_every}, samples every {cfg.validate_every} steps.")


def image_size(value) -> tuple[int, int] | None:
    """(width, height) of an undecoded `datasets` image, reading only the file's header."""
    from PIL import Image

    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str):
        return None
    with Image.open(path) as im:
        return im.size


def param_groups(cfg: TrainConfig, unet_params: list, text_encoder: TextEncoder) -> list[dict]:
    """The U-Net, the text transformer and the token embeddings, each at its own peak learning rate."""
    table = text_encoder.model.get_input_embeddings().weight
    body = [p for p in text_encoder.model.parameters() if p.requires_grad and p is not table]
    groups = [{"params": unet_params, "lr": cfg.lr}, {"params": body, "lr": cfg.text_lr},
              {"params": [table] if table.requires_grad else [], "lr": cfg.embedding_lr}]
    return [g for g in groups if g["params"]]


RUN_IDENTITY = ("data", "init", "text_encoder", "preset", "context_layers", "position_embedding", "resolution",
                "image_column", "caption_column", "batch_size", "grad_accum", "prediction_type", "seed",
                "text_encoder_training", "grow_tokenizer", "min_word_count")


def check_same_run(cfg: TrainConfig, saved: dict, path: Path) -> None:
    """Resuming with settings that change the model, the data or the batches would silently mix two runs:
    name what differs instead. (Steps, learning rates and cadences may change: that extends or retunes a run.)"""
    mine = asdict(cfg)
    differ = [k for k in RUN_IDENTITY if k in saved and _same(mine[k]) != _same(saved[k])]
    if differ:
        what = ", ".join(f"{k}: {saved[k]!r} there, {mine[k]!r} now" for k in differ[:4])
        raise ValueError(f"{path} was written by a run with other settings ({what}); use a new --out, or the "
                         "same settings to resume.")


def _same(value):
    return list(value) if isinstance(value, tuple) else value


def average_across_processes(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average gradients over data-parallel processes (for parameters outside the DDP-wrapped U-Net)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, reduction="mean")


# -- the loop -------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the exported pipeline folder."""
    precision = resolve_precision(cfg)
    out = Path(cfg.out)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                              log_with="tensorboard" if tensorboard else None, project_dir=out / "logs")
    if not tensorboard:
        accelerator.print("tensorboard is not installed: logging to the console only (pip install tensorboard)")
    unet, text_encoder, noise_scheduler = build(cfg)
    if cfg.init:  # fine-tuned, then sampled, at --resolution or fine_tune_size
        base, size = unet.config.sample_size, cfg.resolution or fine_tune_size(unet.config)
        if size != base:
            unet = at_resolution(unet, size)
        if cfg.resolution or size != base:
            why = "" if cfg.resolution else (f", not its {base} px: it learns a small folder in fewer steps, each "
                                             f"faster (--resolution {base} keeps its size)")
            accelerator.print(f"fine-tuning {cfg.init} at {size} px{why}. The export samples at that size.")
    cfg = replace(cfg, resolution=unet.config.sample_size)
    check_resolution(unet, cfg.resolution)
    dataset = load_captioned(resolve_data(cfg), LoadConfig(resolution=cfg.resolution, image_column=cfg.image_column,
                                                  caption_column=cfg.caption_column, pick_caption=False,
                                                  object_masks=cfg.grounding_weight > 0))
    captions = all_captions(dataset, cfg.caption_column)
    cfg = resolve_auto(cfg, len(dataset), captions, text_encoder)
    accelerator.print(describe_run(cfg, dataset, captions))
    if cfg.grow_tokenizer:
        added = text_encoder.grow(captions, cfg.min_word_count)
        accelerator.print(f"tokenizer: {len(added)} of the captions' words are now whole tokens "
                          f"({len(text_encoder.tokenizer)} tokens), e.g. {', '.join(added[:8])}")
    # The shapes set (generated, or a folder data.shapes wrote: it has the `objects` column) is in the grammar
    # layout guidance reads; anyone else's captions are not.
    grammar = SHAPES if is_shapes(cfg) or "objects" in dataset.hf.column_names else None
    summary = CaptionSummary.from_captions(captions, grammar, tokenizer=text_encoder.tokenizer,
                                           source=f"train.py --data {cfg.data} (column {cfg.caption_column!r})")
    text_params = text_encoder.set_trainable(cfg.text_encoder_training)
    text_encoder.to(accelerator.device)
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    params = unet_params + text_params  # a list: clip_grad_norm_ may not eat an iterator
    # The fused kernel: one pass over all parameters instead of ~10 ops each (438 tensors): 6.3 instead of
    # 20.3 ms a step on 2 CPU cores, measured; CPU and CUDA have it.
    optimizer = torch.optim.AdamW(param_groups(cfg, unet_params, text_encoder), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=accelerator.device.type in ("cpu", "cuda"))
    ema = EMAModel(params, decay=cfg.ema_decay)

    step, seconds, loss_value = 0, 0.0, float("nan")
    found = checkpoints(out / "checkpoints")
    if found:
        step, path = found[-1]
        unet.load_state_dict(load_file(path / "unet.safetensors"), strict=True)
        state = json.loads((path / "state.json").read_text())
        check_same_run(cfg, state["config"], path)
        if text_params:
            text_encoder.model.load_state_dict(load_file(path / "text_encoder.safetensors"), strict=True)
        load_optimizer(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])  # this run's peaks
        ema_tensors = load_file(path / "ema.safetensors")
        ema.load_state_dict({**state["ema"], "shadow_params": [ema_tensors[str(i)] for i in range(len(params))]})
        seconds, loss_value = state["seconds"], state["loss"]
        accelerator.print(f"resuming from {path} (step {step})")
    # Not prepared by accelerate: its scheduler wrapper steps once per process on each optimizer step.
    scheduler = lr_schedule(optimizer, cfg.warmup, cfg.steps, done=step, min_lr_rate=0.1)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.to(accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = accelerator.prepare_data_loader(  # sharded across processes by accelerate; moved to the device below
        shuffled_loader(dataset, cfg.batch_size, cfg.steps * cfg.grad_accum * cfg.batch_size * world, cfg.seed,
                        collate), device_placement=False)
    batches = iter(accelerator.skip_first_batches(loader, step * cfg.grad_accum) if step else loader)
    # TensorBoard's hparams take scalars and strings only.
    accelerator.init_trackers("train", config={k: v if isinstance(v, int | float | str | bool) else str(v)
                                               for k, v in asdict(cfg).items()})

    progress = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, disable=not accelerator.is_main_process)
    t_start = time.perf_counter() - seconds
    for step in progress:
        # Every random draw of the step comes from here: caption picks and dropout, noise, timesteps.
        generator = torch.Generator().manual_seed(step_seed(cfg, step, rank))
        lr = scheduler.get_last_lr()[0]  # the U-Net group's rate for this step
        t0 = time.perf_counter()
        for _ in range(cfg.grad_accum):
            x0, phrasings, items = next(batches)
            picks = torch.randint(0, 1 << 30, (len(phrasings),), generator=generator).tolist()
            captions = [p[r % len(p)] for p, r in zip(phrasings, picks, strict=True)]
            drop = torch.rand(len(captions), generator=generator) < cfg.caption_dropout
            captions = ["" if d else c for d, c in zip(drop.tolist(), captions, strict=True)]
            enc = text_encoder.encode(captions)
            recorder = GroundingRecorder() if cfg.grounding_weight > 0 or cfg.relation_weight > 0 else None
            recording = (accelerator.unwrap_model(unet).record_attention(recorder) if recorder
                         else contextlib.nullcontext())
            with accelerator.accumulate(unet), accelerator.autocast():
                with recording:
                    loss = diffusion_loss(unet, noise_scheduler, x0.to(accelerator.device), enc.context,
                                          enc.mask, cfg, generator)
                denoise_value = loss.detach()
                attention_values = {}
                if cfg.grounding_weight > 0:
                    places = [it["object_places"] for it in items] if cfg.ground_positions else None
                    targets, valid = token_targets(enc, [it["object_masks"] for it in items],
                                                   [it["object_words"] for it in items], enc.context.shape[1],
                                                   places, relations=cfg.ground_relations)
                    token, pixel = grounding_loss(recorder.maps, targets, valid)
                    loss = loss + cfg.grounding_weight * (token + cfg.grounding_pixel_weight * pixel)
                    attention_values.update(grounding_token=token.item(), grounding_pixel=pixel.item())
                if cfg.relation_weight > 0:
                    relation = relation_loss(recorder.maps, relation_pairs(enc, enc.context.shape[1]))
                    loss = loss + cfg.relation_weight * relation
                    attention_values["relation"] = relation.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    average_across_processes(accelerator, text_params)  # the U-Net's DDP wrapper does its own
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        loss_value = accelerator.gather(denoise_value[None]).mean().item()  # the denoising loss alone
        total = accelerator.gather(loss.detach()[None]).mean().item()
        if not (math.isfinite(loss_value) and math.isfinite(total)):
            last = checkpoints(out / "checkpoints")
            raise FloatingPointError(
                f"loss became {total} at step {step}; stopping. The last good checkpoint is "
                f"{last[-1][1] if last else 'none (no checkpoint was written yet)'}: lower --lr or use "
                "--mixed-precision no, then re-run to resume from it."
            )
        scheduler.step()
        ema.step(params)
        images_per_s = cfg.batch_size * cfg.grad_accum * world / (time.perf_counter() - t0)
        logs = {"loss": loss_value, "lr": lr, "images_per_s": images_per_s, **attention_values}
        progress.set_postfix({k: f"{v:.1f}" if k == "images_per_s" else f"{v:.4f}" for k, v in logs.items()
                              if k != "lr"})
        done = step + 1
        accelerator.log(logs, step=done)
        if accelerator.is_main_process:  # what any tool reads back (benchmarks.devices: images/s), TensorBoard or not
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": done, **logs}) + "\n")
        if accelerator.is_main_process and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            opt_tensors, opt_meta = optimizer_tensors(optimizer)
            ema_state = ema.state_dict()
            shadow = {str(i): p for i, p in enumerate(ema_state.pop("shadow_params"))}
            state = {"step": done, "seconds": time.perf_counter() - t_start, "loss": loss_value,
                     "hardware": hardware(accelerator.device), "precision": precision,
                     "config": asdict(cfg), "optimizer": opt_meta, "ema": ema_state}
            tensors = {"unet": accelerator.unwrap_model(unet).state_dict(), "optimizer": opt_tensors, "ema": shadow}
            if text_params:  # the text side trains: its weights and the grown tokenizer resume with the run
                tensors["text_encoder"] = text_encoder.model.state_dict()
            save_checkpoint(out / "checkpoints", done, tensors, state, cfg.keep_checkpoints,
                            partial(write_extra, text_encoder.tokenizer if text_params else None, summary))
        if accelerator.is_main_process and (done % cfg.validate_every == 0 or done == cfg.steps):
            with swapped_in_ema(ema, params):
                pipe = TextToImagePipeline(accelerator.unwrap_model(unet), text_encoder,
                                           dict(noise_scheduler.config), captions=summary)
                grid = validation_grid(pipe, cfg.validation_prompts, cfg.seed, cfg.validation_steps,
                                       out / "samples" / f"step_{done:06d}.png")
            if tensorboard:
                writer = accelerator.get_tracker("tensorboard", unwrap=True)
                writer.add_image("validation", np.asarray(grid), done, dataformats="HWC")
            unet.train()
    accelerator.wait_for_everyone()
    check_ranks_agree(accelerator, params)

    dest = out / "pipeline"
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        ema.copy_to(params)  # export the EMA weights
        export(final, text_encoder, noise_scheduler, cfg, cfg.steps, time.perf_counter() - t_start, precision,
               hardware(accelerator.device), loss_value, captions=summary)
        accelerator.print(f"exported {dest}")
        if cfg.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            create_repo(cfg.push_to_hub, exist_ok=True)
            upload_folder(repo_id=cfg.push_to_hub, folder_path=dest, commit_message=f"train.py, {cfg.steps} steps")
            accelerator.print(f"pushed to https://huggingface.co/{cfg.push_to_hub}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # Teardown: when the DDP wrapper dies it joins gloo's worker thread while holding the GIL; if that
        # thread is still freeing a finished collective (which needs the GIL) both wait forever (seen under
        # load, after a barrier too). Everything is written and every rank is here: leave without destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return dest


def check_ranks_agree(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Data-parallel ranks must end with identical weights; compare a checksum across processes."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum()[None].to(accelerator.device)
    sums = accelerator.gather(checksum)
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"weights differ across the {accelerator.num_processes} processes: {sums.tolist()}")
    accelerator.print(f"weights identical on all {accelerator.num_processes} processes (checksum {sums[0].item():.6f})")


class swapped_in_ema:
    """Swap EMA weights into the model for validation, and the trained weights back after."""

    def __init__(self, ema: EMAModel, params: list[torch.nn.Parameter]):
        self.ema, self.params = ema, params

    def __enter__(self):
        self.ema.store(self.params)
        self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        self.ema.restore(self.params)


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or str(f.type) == "bool":
            parser.add_argument(flag, action="store_true", default=f.default)
        elif str(f.type) == "bool | None":  # None: decided by the run; --flag / --no-flag decide yourself
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "validation_prompts":  # tuple[str, ...] | None
            parser.add_argument(flag, nargs="+", default=f.default)
        else:
            kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(
                getattr(f.type, "__name__", str(f.type)), str)
            parser.add_argument(flag, type=kind, default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.export_only:
        print(f"exported {export_checkpoint(cfg)}")
        return
    try:
        train(cfg)
    except CheckpointWriteError as e:  # a full disk: say what is safe and what to do, not a traceback
        sys.exit(f"train.py stopped: {e}")


if __name__ == "__main__":
    main()
