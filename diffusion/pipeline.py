"""TextToImagePipeline: prompt → images (+ where every word looked), over a diffusers-layout folder.

    pipe = TextToImagePipeline.from_pretrained("weights/default")
    result = pipe("a red circle above a blue square", num_images=4, seed=0, record_attention=True)
    result.images           # 4 PIL images
    result.attention.word_maps(0)   # {"red": (H, W) map, "circle": …} for the first image

Folder layout (diffusers pipeline style): unet/ (config.json + model.safetensors), text_encoder/,
tokenizer/, scheduler/scheduler_config.json (the training noise schedule), README.md (model card),
captions.json (a summary of the training captions: what the model knows, diffusion/vocabulary.py).
"""

import copy
import secrets
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from conditioning.text_encoder import TextEncoder
from core.precision import inference_dtype
from diffusion.layout import check_strengths, layout_guide, relation_notes
from diffusion.limits import MAX_STEPS
from diffusion.maps import AttentionMaps
from diffusion.prompts import parse_emphasis, token_weights
from diffusion.sampling import DEFAULT_SAMPLER, guided_model, make_scheduler, sample
from diffusion.vocabulary import (
    CAPTIONS_FILE,
    CaptionSummary,
    layout_grammar,
    layout_off_note,
    unknown_words,
    unknown_words_warning,
    whole_words,
)
from unet import AttentionStore, UNet
from unet.fast import optimize_for_inference


@dataclass
class GenerationResult:
    """What one pipeline call returns.

    images: PIL images, prompt-major (prompt 0's images first). seeds: the seed of each image (image i of
    a call with seed s has seed s + i, so any single image can be remade alone). tokens / words /
    word_ids: per image, as the text encoder split its prompt. warnings: unknown words, truncation.
    attention: the recorded maps when record_attention=True, else None. relation_guided / object_guided:
    whether relation / object guidance nudged this call (a prompt it applies to and its strength > 0).
    guidance_notes: what layout guidance could not do ("layout guidance is off: …", a relation phrase it
    does not read), one line each, for a status line rather than a warning.
    """

    images: list[Image.Image]
    seed: int
    seeds: list[int]
    prompts: list[str]
    tokens: list[list[str]]
    words: list[list[str]]
    word_ids: list[list[int | None]]
    warnings: list[str] = field(default_factory=list)
    attention: AttentionMaps | None = None
    relation_guided: bool = False
    object_guided: bool = False
    guidance_notes: list[str] = field(default_factory=list)


class TextToImagePipeline:
    """A text-conditioned U-Net, its frozen CLIP text encoder, and the training noise schedule.

    Args:
        unet: the denoiser; its context_dim must equal text_encoder.hidden_size.
        text_encoder: the frozen CLIP text encoder wrapper.
        scheduler_config: the training scheduler's config (a diffusers scheduler config dict).
        model_card: the README.md written beside the weights, if any.
        captions: the summary of the captions it was trained on (diffusion/vocabulary.py), saved beside the
            weights as captions.json: the app's examples, what the model knows, the unknown-word check and
            whether layout guidance reads its prompts come from it. None for a folder without one (the
            tokenizer's whole words stand in).
    """

    def __init__(self, unet: UNet, text_encoder: TextEncoder, scheduler_config: dict, model_card: str | None = None,
                 captions: CaptionSummary | None = None):
        if unet.config.context_dim != text_encoder.hidden_size:
            raise ValueError(
                f"the U-Net reads text of width {unet.config.context_dim} but the text encoder produces "
                f"{text_encoder.hidden_size}; use the text encoder the U-Net was trained with."
            )
        self.unet = unet.eval()
        self._sampling_unet: UNet | None = None  # see sampling_unet
        self.text_encoder = text_encoder
        self.scheduler_config = dict(scheduler_config)
        self.model_card = model_card
        self.captions = captions
        self.folder: Path | None = None  # the folder it was loaded from (from_pretrained), e.g. a fine-tune's base
        self._whole_words: tuple[object, int, list[str]] | None = None  # (tokenizer, its size, its whole words)
        # Recording attaches a store to the shared U-Net's blocks: calls from several threads (a server's
        # workers, a warm-up) take turns, so one call's maps never land in another's store.
        self._lock = threading.Lock()

    # -- folders ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype = "auto") -> "TextToImagePipeline":
        """Load a pipeline folder. dtype: the U-Net's compute type, "auto" (the fastest safe one on this
        device: bf16 on a CPU with AVX-512 BF16/AMX or a GPU, else fp32; see core/precision.py),
        "fp32", "bf16", or a torch.dtype. The text encoder stays fp32 (it runs once per call)."""
        path = Path(path)
        missing = [f"{p}/" for p in ("unet", "text_encoder", "tokenizer", "scheduler") if not (path / p).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a pipeline folder: missing {', '.join(missing)} (expected unet/, text_encoder/, "
                "tokenizer/ and scheduler/, as written by TextToImagePipeline.save_pretrained or train.py)."
            )
        unet = UNet.from_pretrained(path / "unet")
        text_encoder = TextEncoder.from_pretrained(str(path))
        scheduler_config = dict(DDPMScheduler.load_config(path / "scheduler"))
        card = (path / "README.md").read_text() if (path / "README.md").is_file() else None
        captions = CaptionSummary.load(path) if (path / CAPTIONS_FILE).is_file() else None
        pipe = cls(unet, text_encoder, scheduler_config, card, captions).to(device)
        pipe.folder = path
        return pipe.to(dtype=dtype if isinstance(dtype, torch.dtype) else inference_dtype(pipe.device, dtype))

    def save_pretrained(self, path: str | Path, unet_dtype: torch.dtype | None = None) -> None:
        """Write the pipeline folder. unet_dtype=torch.float16 stores the U-Net weights at half the size
        (loading casts them back to the model's fp32 parameters)."""
        path = Path(path)
        unet_dtype = unet_dtype or torch.float32
        unet = self.unet if self.dtype == unet_dtype else copy.deepcopy(self.unet).to(unet_dtype)
        unet.save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path)
        DDPMScheduler.from_config(self.scheduler_config).save_pretrained(path / "scheduler")
        if self.model_card is not None:
            (path / "README.md").write_text(self.model_card)
        if self.captions is not None:
            self.captions.save(path)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "TextToImagePipeline":
        """Move to `device`; cast the U-Net to `dtype` (its inputs are cast to match at every step)."""
        if device is not None:
            self.unet.to(device)
            self.text_encoder.to(device)
        if dtype is not None:
            self.unet.to(dtype)
        self._sampling_unet = None  # made again, for the new device and dtype
        return self

    @property
    def sampling_unet(self) -> UNet:
        """The U-Net the sampling loop calls: `optimize_for_inference(self.unet)`, a frozen copy with the CPU
        fast path (unet/fast.py), made at first use and again after `to()`. Layout guidance differentiates
        through `self.unet` itself. Change `self.unet`'s weights in place only before the first call (or call
        `to()` after): the copy does not follow them."""
        if self._sampling_unet is None:
            self._sampling_unet = optimize_for_inference(self.unet)
        return self._sampling_unet

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The U-Net's compute type (noise, scheduler and images stay fp32)."""
        return next(self.unet.parameters()).dtype

    # -- what the model knows ----------------------------------------------------------------------
    @property
    def whole_words(self) -> list[str]:
        """The tokenizer's whole words, sorted (diffusion.vocabulary.whole_words); read once per tokenizer."""
        tokenizer = self.text_encoder.tokenizer
        if self._whole_words is None or self._whole_words[:2] != (tokenizer, len(tokenizer)):
            self._whole_words = (tokenizer, len(tokenizer), whole_words(tokenizer))
        return self._whole_words[2]

    @property
    def known_words(self) -> Collection[str]:
        """The words this model learned: its training captions' words, or without a caption summary its
        tokenizer's whole words."""
        return self.captions.word_counts if self.captions is not None else set(self.whole_words)

    @property
    def layout_grammar(self) -> str | None:
        """The caption grammar layout guidance reads this model's prompts in ("shapes"), or None: off."""
        return layout_grammar(self.captions, self.whole_words)

    # -- generation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images: int = 1,
        steps: int = 20,
        guidance_scale: float = 4.0,
        seed: int | None = None,
        sampler: str = DEFAULT_SAMPLER,
        record_attention: bool = False,
        callback: Callable[[int, int, int], None] | None = None,
        height: int | None = None,
        width: int | None = None,
        attention_bins: int = 4,
        self_attention_per_bin: int | None = 1,
        relation_guidance: float = 0.0,
        object_guidance: float = 0.0,
    ) -> GenerationResult:
        """Generate `num_images` images per prompt.

        negative_prompt replaces the empty prompt of classifier-free guidance. `(word:1.5)` in a prompt
        scales that word's cross-attention (see diffusion/prompts.py). callback(step, timestep, steps)
        runs before each denoising step. The same seed gives the same images on the same device.

        With record_attention, cross-attention is recorded at every step and summed into
        `attention_bins` timestep bins; self-attention at `self_attention_per_bin` steps of each bin
        (1: its middle step; None: every step). Recording it at every step made 4 images × 20 steps
        take 1.21× the time without maps instead of 1.03× (bf16; fp32: 1.25× vs 1.07×;
        benchmarks/endtoend.py).

        relation_guidance (η, e.g. diffusion.layout.RELATION_GUIDANCE): in prompts with a relation ("A above
        B"), nudge the noise in the first steps so A's word maps lie above B's (diffusion/layout.py); 0 is
        off. object_guidance (e.g. diffusion.layout.OBJECT_GUIDANCE): in prompts naming two objects or more
        without a relation ("A and B"), nudge it so every object's words are attended somewhere,
        Attend-and-Excite's loss; in prompts with a number word ("three red circles", no relation), so
        the phrase's attention fills that many cells of the 3 × 3 grid and no more. Prompts none
        applies to are unchanged, with or without them.
        """
        with self._lock:  # recording attaches to the shared U-Net: calls take turns
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negatives = self._negatives(negative_prompt, len(prompts))
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
            if not 1 <= steps <= MAX_STEPS:
                raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}.")
            if num_images < 1:
                raise ValueError(f"num_images must be at least 1, got {num_images}.")
            parsed = [parse_emphasis(p) for p in prompts]
            plain = [text for text, _ in parsed for _ in range(num_images)]  # B = len(prompts) · num_images
            emphasis = [weights for _, weights in parsed for _ in range(num_images)]
            negatives = [n for n in negatives for _ in range(num_images)]
            B = len(plain)

            enc = self.text_encoder.encode(negatives + plain)  # rows: B negatives, then B prompts
            prompt_enc = enc.rows(slice(B, None))
            weights = None
            if any(emphasis):
                cond = token_weights(enc.words[B:], enc.word_ids[B:], emphasis, enc.mask.shape[1])
                weights = torch.cat([torch.ones_like(cond), cond]).to(self.device, self.dtype)  # (2B, L)
            context = enc.context.to(self.device, self.dtype)

            seed = secrets.randbelow(2**31) if seed is None else int(seed)
            c = self.unet.config
            H, W = height or c.sample_size, width or c.sample_size
            noise = torch.stack([
                torch.randn(c.in_channels, H, W, generator=torch.Generator().manual_seed(seed + i)) for i in range(B)
            ]).to(self.device)  # (B, C, H, W); drawn on the CPU so a seed means the same noise everywhere
            scheduler = make_scheduler(self.scheduler_config, sampler)
            scheduler.set_timesteps(steps, device=self.device)

            store = None
            if record_attention:
                store = AttentionStore(steps, attention_bins, rows=None, self_attention_rows=slice(B, 2 * B),
                                       num_tokens=enc.mask.shape[1], self_attention_per_bin=self_attention_per_bin)

            def on_step(step: int, t: int) -> None:
                if store is not None:
                    store.set_step(step)
                if callback is not None:
                    callback(step, t, steps)

            guide, notes = self._layout_guide(prompt_enc, context[B:], None if weights is None else weights[B:],
                                              scheduler, relation_guidance, object_guidance)
            generator = torch.Generator().manual_seed(seed)  # for stochastic samplers (DDPM)
            unet = self.sampling_unet
            model = guided_model(unet, context, enc.mask.to(self.device), guidance_scale, weights)
            if store is None:
                x = sample(model, scheduler, noise, generator, on_step, guide)
            else:
                with unet.record_attention(store):
                    x = sample(model, scheduler, noise, generator, on_step, guide)

            result = GenerationResult(
                images=to_pil(x), seed=seed, seeds=[seed + i for i in range(B)], prompts=plain,
                tokens=prompt_enc.tokens, words=prompt_enc.words, word_ids=prompt_enc.word_ids,
                warnings=self.prompt_warnings(prompt_enc), relation_guided=guide is not None and guide.relations,
                object_guided=guide is not None and guide.objects, guidance_notes=notes,
            )
            if store is not None:
                result.attention = AttentionMaps(store, enc, num_images=B, image_size=(H, W),
                                                 prompts=plain, negative_prompts=negatives, seed=seed, sampler=sampler)
            return result

    def _layout_guide(self, enc, context, token_weights, scheduler, relation: float, objects: float):
        """The layout guide for the prompts (rows of the prompt half) and the notes for the status line:
        guidance runs only where the model's vocabulary makes sense of the prompt (its captions are in the
        shapes grammar); elsewhere nothing of that grammar runs, and one note says so."""
        check_strengths(relation, objects)
        if relation == 0 and objects == 0:
            return None, []
        if self.layout_grammar is None:
            return None, [layout_off_note(self.captions)]
        guide = layout_guide(self.unet, enc, context, enc.mask.to(self.device), token_weights, scheduler,
                             self.scheduler_config["num_train_timesteps"], relation, objects)
        return guide, relation_notes(enc) if relation else []

    def prompt_warnings(self, enc) -> list[str]:
        """User-facing warnings about encoded prompts: words the model never saw, truncation."""
        out = []
        known, from_captions = self.known_words, self.captions is not None
        for words, unreadable, truncated in zip(enc.words, enc.unknown_words, enc.truncated, strict=True):
            if unknown := unknown_words(words, known, unreadable):
                out.append(unknown_words_warning(unknown, from_captions))
            if truncated:
                out.append("the prompt was longer than the text encoder takes and was cut; shorten it")
        return list(dict.fromkeys(out))

    @staticmethod
    def _negatives(negative_prompt: str | list[str] | None, n: int) -> list[str]:
        if negative_prompt is None:
            return [""] * n
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n
        if len(negative_prompt) != n:
            raise ValueError(
                f"got {len(negative_prompt)} negative prompts for {n} prompts; give one per prompt, or one string."
            )
        return list(negative_prompt)


def model_folders(root: str | Path = "weights") -> list[Path]:
    """The pipeline folders in `root` (those with a unet/): `default` first, then the others by name."""
    root = Path(root)
    found = sorted(p for p in root.iterdir() if (p / "unet").is_dir()) if root.is_dir() else []
    return sorted(found, key=lambda p: p.name != "default")


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL RGB images. NaN/inf means a broken model or precision: refuse it."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            "the sampler produced NaN or inf values (black images otherwise); on CPU use float32 or bfloat16, "
            "never float16, and check that the model was trained with this prediction type."
        )
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
