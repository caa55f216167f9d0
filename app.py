"""Gradio app: type a prompt, get samples, and see where every word (and every pixel) looked.

    python app.py                                  # serves weights/default
    python app.py --model runs/default/pipeline    # any pipeline folder written by train.py
    python app.py --model owner/name --port 7861   # a hub id (downloaded once, then cached)

The UI is wiring only: sampling and attention recording live in `diffusion.pipeline`, map
aggregation and overlays in `diffusion.maps`, and what the loaded model knows (its example prompts, its
words, the prompt words it never saw, whether layout guidance reads its prompts) in `diffusion.vocabulary`,
from the model's own tokenizer and caption summary: nothing here assumes a vocabulary. `build_demo(pipe)`
returns the Blocks; the model is loaded once, in `main()`, and nothing heavy happens at import time (as a
Space runs it).

Named API endpoints (gradio_client): `generate` (samples + seed), then, in the same client session,
`attention` (per-word overlays, per-head maps of one word, the layer × word grid), `self_attention`
(where one pixel looked, per self-attention layer) and `export_maps` (a zip of PNG + npz + JSON).
"""

import argparse
import atexit
import contextvars
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, ImageDraw, ImageFont

from diffusion.grammar import NAME as SHAPES_GRAMMAR
from diffusion.layout import OBJECT_GUIDANCE, RELATION_GUIDANCE
from diffusion.maps import AttentionMaps, display_size, normalize_maps, overlay
from diffusion.pipeline import GenerationResult, TextToImagePipeline
from diffusion.prompts import MAX_WEIGHT
from diffusion.sampling import DEFAULT_SAMPLER, SAMPLERS
from diffusion.vocabulary import CAPTIONS_FILE, example_prompts, layout_off_note

DEFAULT_MODEL = "weights/default"

# Limits: a 2-vCPU Space runs one request at a time, so they bound how long one user holds the queue.
MAX_PROMPT_CHARS = 300
MAX_STEPS = 100
MAX_IMAGES = 8
MAX_GUIDANCE = 20.0
MAX_RELATION_GUIDANCE = 200.0  # beyond ~100 the pair is ordered but drawn less often (diffusion/layout.py)
MAX_OBJECT_GUIDANCE = 100.0  # beyond ~40 it draws two objects less often again (diffusion/layout.py)
MAX_SEED = 2**31 - 1

DISPLAY = 256  # samples are 16–32 px: shown nearest-upscaled to this many pixels on the longer side
GRID_CELL = 96  # one cell of the layer × word grid
SAMPLES_WIDTH = 640  # about the samples gallery's width on a laptop screen, for its height
ALL_LAYERS = "all"
MEAN_HEADS = -1

KNOWN_WORDS_SHOWN = 60  # "What this model knows": the most used caption words listed …
WHOLE_WORDS_SHOWN = 400  # … or, for a model without a caption summary, its tokenizer's whole words
FUNCTION_WORDS = {"a", "an", "the", "of", "to", "on", "in", "at", "and", "<start>", "<end>"}
NORMALIZATIONS = [
    ("per word (min–max)", "minmax"),
    ("absolute (compare words)", "absolute"),
    ("share per pixel (which word wins)", "tokens"),
]
NORMALIZATION_LABELS = {value: label for label, value in NORMALIZATIONS}

# How to read the word maps. Models of the shapes grammar were trained with a grounding loss on their colour,
# shape and size words (diffusion/grounding.py and weights/default/README.md); other models' words were not.
GROUNDED_WORDS_NOTE = (
    "How to read these: the shipped model was trained to point its colour, shape and size words at their "
    "objects (a grounding loss; see the model card). Other words (*a*, *two*, *above*, *on*, *background*) "
    "were not. Each word's vector also carries the rest of the prompt (CLIP reads left to right, and the "
    "U-Net's context layer mixes the whole prompt), so an ungrounded word often lights up an object named "
    "near it."
)
WORDS_NOTE = (
    "How to read these: each word's vector carries the rest of the prompt too (CLIP reads left to right, and the "
    "U-Net's context layers, where it has them, mix the whole prompt), so a word often lights up an object named "
    "near it."
)

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="pink")
# Browsers smooth upscaled images; tiny samples must stay crisp pixels.
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
#title { margin-bottom: 0; }
#status { min-height: 2.5em; }
.small-note { font-size: 0.9em; opacity: 0.85; }
"""


# -- one thread for all torch work ------------------------------------------------------------------
# PyTorch's OpenMP (libgomp) gives every thread that starts a parallel region its own team of worker
# threads. Once teams hold more threads than there are cores, libgomp stops spinning between regions
# and sleeps instead, and a U-Net step took 92 instead of 58 ms (a 4-image, 20-step call 2.4 instead
# of 1.5 s; measured on 2 cores). Gradio runs handlers on its own worker threads, so the app's torch
# work (loading, warm-up, sampling, rendering maps) all goes through this one thread.
_TORCH_THREAD = "torch-compute"
_COMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_TORCH_THREAD)


def on_torch_thread(fn):
    """Run `fn` on the app's one torch thread and wait for it. Gradio's context goes along, so progress
    bars and warnings still reach their event; a call from that thread itself runs directly."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread().name.startswith(_TORCH_THREAD):
            return fn(*args, **kwargs)
        return _COMPUTE.submit(contextvars.copy_context().run, fn, *args, **kwargs).result()

    return wrapper


# -- requests: checks that name the limit -------------------------------------------------------
def check_request(prompt: str, negative_prompt: str | None, steps: float, guidance: float, seed: float,
                  num_images: float, sampler: str, relation_guidance: float = 0.0,
                  object_guidance: float = 0.0) -> None:
    """Raise gr.Error (shown as a toast, and as AppError to API clients) for a request out of bounds."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise gr.Error("The prompt is empty: describe the image in words this model knows (see 'What this "
                       "model knows' and the examples).")
    for name, text in [("prompt", prompt), ("negative prompt", negative_prompt or "")]:
        if len(text) > MAX_PROMPT_CHARS:
            raise gr.Error(f"The {name} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}. Shorten it.")
    for name, value, low, high in [("steps", steps, 1, MAX_STEPS), ("number of images", num_images, 1, MAX_IMAGES),
                                   ("seed", seed, 0, MAX_SEED)]:
        if value is None or not float(value).is_integer() or not low <= value <= high:
            raise gr.Error(f"{name} must be a whole number from {low} to {high}, got {value}.")
    if guidance is None or not 0 <= guidance <= MAX_GUIDANCE:
        raise gr.Error(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {guidance}.")
    for name, value, high in [("relation guidance", relation_guidance, MAX_RELATION_GUIDANCE),
                              ("object guidance", object_guidance, MAX_OBJECT_GUIDANCE)]:
        if value is None or not 0 <= value <= high:
            raise gr.Error(f"{name} must be between 0 (off) and {high:g}, got {value}.")
    if sampler not in SAMPLERS:
        raise gr.Error(f"unknown sampler {sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}.")


def check_inputs(prompt: str, negative_prompt: str, steps: float, guidance: float, seed: float,
                 randomize_seed: bool, sampler: str, num_images: float, relation_guidance: float,
                 object_guidance: float) -> None:
    """check_request for the generate form (a seed about to be randomised needs no check)."""
    check_request(prompt, negative_prompt, steps, guidance, 0 if randomize_seed else seed, num_images, sampler,
                  relation_guidance, object_guidance)


def upscale(image: Image.Image, size: int = DISPLAY) -> Image.Image:
    return image.resize(display_size(image.size, size), Image.NEAREST)


def knows_note(pipe: TextToImagePipeline, limit: int = KNOWN_WORDS_SHOWN) -> str:
    """'What this model knows': the words its training captions used most, its tokenizer's whole words, and
    whether layout guidance reads its prompts."""
    summary, whole = pipe.captions, pipe.whole_words
    if summary is not None:
        shown = ", ".join(f"{w} ({n:,})" for w, n in summary.most_common(limit))
        more = len(summary.word_counts) - limit
        learned = (f"It was trained on **{summary.num_captions:,} captions** in **{len(summary.word_counts):,} "
                   f"different words**, and draws what they described. The words they used most (times used): "
                   f"{shown}{f', … and {more:,} more' if more > 0 else ''}.")
    else:
        more = len(whole) - WHOLE_WORDS_SHOWN
        shown = ", ".join(whole[:WHOLE_WORDS_SHOWN]) + (f", … and {more:,} more" if more > 0 else "")
        learned = (f"This model's folder has no summary of its training captions ({CAPTIONS_FILE}), so what they "
                   f"said is not known here; its tokenizer's whole words are the best guide: {shown}.")
    tokenizer = (f"Its tokenizer holds **{len(whole):,} whole words**; other words are split into pieces, and a "
                 f"warning lists the prompt words the model never learned.")
    off = layout_off_note(summary)
    layout = ("Layout guidance reads its prompts in the shapes grammar (relations, counts and places)."
              if pipe.layout_grammar == SHAPES_GRAMMAR else off[0].upper() + off[1:])
    return "\n\n".join([learned, tokenizer, layout])


def model_card_text(pipe: TextToImagePipeline) -> str:
    card = pipe.model_card or "This model folder has no model card (README.md)."
    if card.startswith("---"):  # YAML front matter is for the Hub, not for readers
        card = card.split("---", 2)[-1]
    return card.strip()


# -- generation -----------------------------------------------------------------------------------
@on_torch_thread
def generate(pipe: TextToImagePipeline, prompt: str, negative_prompt: str, steps: float, guidance: float,
             seed: float, randomize_seed: bool, sampler: str, num_images: float,
             progress: gr.Progress, relation_guidance: float = RELATION_GUIDANCE,
             object_guidance: float = OBJECT_GUIDANCE) -> tuple[list, int, str, GenerationResult]:
    """Sample with attention recording on. Returns gallery items, the seed used, a status line, the result."""
    if randomize_seed:
        seed = int.from_bytes(os.urandom(4), "little") % (MAX_SEED + 1 - MAX_IMAGES)
    check_request(prompt, negative_prompt, steps, guidance, seed, num_images, sampler, relation_guidance,
                  object_guidance)
    steps, seed, num_images = int(steps), int(seed), int(num_images)

    def on_step(step: int, timestep: int, total: int) -> None:
        progress((step, total), desc="Denoising", unit="steps")

    progress(0, desc="Encoding the prompt")
    start = time.perf_counter()
    try:
        result = pipe(prompt, negative_prompt=negative_prompt or None, num_images=num_images, steps=steps,
                      guidance_scale=float(guidance), seed=seed, sampler=sampler, record_attention=True,
                      callback=on_step, relation_guidance=float(relation_guidance),
                      object_guidance=float(object_guidance))
    except (ValueError, FloatingPointError) as e:  # bad emphasis weights, a broken model: tell the user
        raise gr.Error(str(e)) from e
    seconds = time.perf_counter() - start

    for warning in result.warnings:
        gr.Warning(warning)
    gallery = [(upscale(im), f"seed {s}") for im, s in zip(result.images, result.seeds, strict=True)]
    layout = layout_note(result, relation_guidance, object_guidance)
    status = (f"**Seed {result.seed}** (image *i* uses seed {result.seed} + *i* − 1) · {steps} {sampler} steps · "
              f"guidance {float(guidance):g}{layout} · {seconds:.1f} s. "
              "Click a sample to explore it below.")
    status += "".join(f"\n\n{note}" for note in result.guidance_notes)
    status += "".join(f"\n\n⚠️ {w}" for w in result.warnings)
    return gallery, result.seed, status, result


def layout_note(result: GenerationResult, relation_guidance: float, object_guidance: float) -> str:
    """' · relation guidance 50 · object guidance 20' for the status line: the terms that nudged this call."""
    return ((f" · relation guidance {float(relation_guidance):g}" if result.relation_guided else "")
            + (f" · object guidance {float(object_guidance):g}" if result.object_guided else ""))


# -- attention explorer ---------------------------------------------------------------------------
def attention_of(result: GenerationResult | None, image: float | None) -> tuple[AttentionMaps, int]:
    if result is None or result.attention is None:
        raise gr.Error("No maps yet: generate images first (in this session); the explorer shows the last run.")
    if image is None or not float(image).is_integer() or not 0 <= image < len(result.images):
        raise gr.Error(f"image must be a whole number from 0 to {len(result.images) - 1}, got {image}.")
    return result.attention, int(image)


def explorer_choices(result: GenerationResult) -> tuple:
    """UI updates for a new result: gallery columns, images, layers with resolutions, heads, timestep bins."""
    maps = result.attention
    n = len(result.images)
    columns = 1 if n == 1 else 2 if n <= 4 else 3
    height = 40 + -(-n // columns) * SAMPLES_WIDTH // columns  # rows of square cells: no blank box, no crop
    images = [(f"image {i + 1} · seed {s}", i) for i, s in enumerate(result.seeds)]
    layers = [("all layers (mean)", ALL_LAYERS)] + [
        (f"{name} · {'×'.join(map(str, maps.layer_size(name)))}", name) for name in maps.layers("cross")]
    heads = [("mean of heads", MEAN_HEADS)] + [(f"head {h + 1}", h) for h in range(max_heads(maps, ALL_LAYERS))]
    bins = maps.bins
    bin_info = "0 = all steps · " + " · ".join(
        f"{b + 1}: {steps_label(r)}" for b, r in enumerate(bins)) + " (1 is the noisiest)"
    return (gr.update(columns=columns, height=height), gr.update(visible=True), gr.update(visible=False),
            gr.update(choices=images, value=0), gr.update(choices=layers, value=ALL_LAYERS),
            gr.update(choices=heads, value=MEAN_HEADS), gr.update(maximum=len(bins), value=0, info=bin_info))


def steps_label(steps: range) -> str:
    """Sampling steps, 1-based for people: "step 3" or "steps 1–5"."""
    return f"step {steps.start + 1}" if len(steps) == 1 else f"steps {steps.start + 1}–{steps.stop}"


def max_heads(maps: AttentionMaps, layer: str) -> int:
    """Heads a layer choice has; "all layers" averages head k over layers, so the smallest count."""
    names = maps.layers("cross") if layer == ALL_LAYERS else [layer]
    return min(maps.num_heads(n) for n in names)


def map_options(maps: AttentionMaps, layer: str, time_bin: float, head: float) -> dict:
    if layer != ALL_LAYERS and layer not in maps.layers("cross"):
        raise gr.Error(f"unknown layer {layer!r}; choose '{ALL_LAYERS}' or one of {maps.layers('cross')}.")
    if time_bin is None or not float(time_bin).is_integer() or not 0 <= time_bin <= len(maps.bins):
        raise gr.Error(f"time bin must be a whole number from 0 (all steps) to {len(maps.bins)}, got {time_bin}.")
    head = MEAN_HEADS if head is None else head
    if not float(head).is_integer() or not MEAN_HEADS <= head < max_heads(maps, layer):
        raise gr.Error(f"head must be {MEAN_HEADS} (mean) or 0 to {max_heads(maps, layer) - 1}, got {head}.")
    return {"layer": None if layer == ALL_LAYERS else layer,
            "bins": None if time_bin == 0 else [int(time_bin) - 1],
            "head": None if head == MEAN_HEADS else int(head)}


@on_torch_thread
def render_attention(result: GenerationResult | None, image: float, layer: str, time_bin: float, head: float,
                     normalization: str, special_tokens: bool, negative: bool, alpha: float, word: str | None):
    """Per-word overlays, the heads of one word, and the layer × word grid of the selected image."""
    maps, image = attention_of(result, image)
    opts = map_options(maps, layer, time_bin, head)
    if normalization not in NORMALIZATION_LABELS:
        raise gr.Error(f"unknown normalisation {normalization!r}; choose one of {list(NORMALIZATION_LABELS)}.")
    if alpha is None or not 0 <= alpha <= 1:
        raise gr.Error(f"overlay alpha must be between 0 and 1, got {alpha}.")
    sample = result.images[image]
    common = {"negative": bool(negative), "include_special": bool(special_tokens), "normalize": normalization}
    by_word = maps.word_maps(image, **opts, **common)
    words = list(by_word)
    if not words:
        note = ("The negative prompt is empty: its only tokens are the start/end tokens. Tick *start/end tokens* "
                "to see them, or set a negative prompt under *Advanced settings*." if negative else
                "This prompt has no word tokens to show; tick *start/end tokens*.")
        return [], None, [], None, note
    word = focus(words, word)
    gallery = [(overlay(sample, m, alpha, DISPLAY), w) for w, m in by_word.items()]

    # Per-head view of one word: each head on its own, normalised like the word maps.
    n_heads = max_heads(maps, layer)
    per_head = {f"head {h + 1}": maps.word_maps(image, **{**opts, "head": h}, **common)[word] for h in range(n_heads)}
    if normalization == "absolute":  # compare heads with each other rather than each with itself
        per_head = normalize_maps(per_head, "absolute")
    heads = [(overlay(sample, m, alpha, DISPLAY), name) for name, m in per_head.items()]

    grid = layer_word_grid(maps, sample, image, opts, common, alpha)
    which = "negative prompt" if negative else "prompt"
    shown = maps.bins[opts["bins"][0]] if opts["bins"] else None
    steps = "all steps" if shown is None else f"{steps_label(shown)} of {maps.store.num_steps}"
    where = "all layers" if opts["layer"] is None else f"{layer} ({'×'.join(map(str, maps.layer_size(layer)))})"
    heads_label = "mean of heads" if opts["head"] is None else f"head {opts['head'] + 1}"
    note = (f"Image {image + 1}, {which} words · {where} · {steps} · {heads_label} · "
            f"{NORMALIZATION_LABELS[normalization]}")
    return gallery, word, heads, grid, note


def focus(words: list[str], word: str | None) -> str | None:
    """The word of the per-head view: kept while the prompt has it, else the first content word."""
    if word in words or not words:
        return word if words else None
    return next((w for w in words if w not in FUNCTION_WORDS), words[0])


def word_choices(result: GenerationResult | None, image: float, special_tokens: bool, negative: bool,
                 word: str | None) -> dict:
    """The word selector's choices for the words shown (they change with image, negative and start/end)."""
    maps, image = attention_of(result, image)
    # The keys of word_maps, so labels match ("a #2" for a repeated word); computing one map is cheap.
    words = list(maps.word_maps(image, negative=bool(negative), include_special=bool(special_tokens)))
    return gr.update(choices=words, value=focus(words, word))


def layer_word_grid(maps: AttentionMaps, sample: Image.Image, image: int, opts: dict, common: dict,
                    alpha: float) -> Image.Image:
    """One picture: a row per cross-attention layer (plus all layers), a column per word."""
    rows = [(ALL_LAYERS, "all layers")] + [
        (n, f"{n.removesuffix('.cross_attn')} {'x'.join(map(str, maps.layer_size(n)))}") for n in maps.layers("cross")]
    by_row = [maps.word_maps(image, **{**opts, "layer": None if n == ALL_LAYERS else n}, **common) for n, _ in rows]
    words = list(by_row[0])
    font = ImageFont.load_default(size=13)  # Pillow's bundled font: no "×" glyph, hence "16x16" above
    label_w, header_h, pad = 150, 24, 4
    cell = GRID_CELL + pad
    grid = Image.new("RGB", (label_w + cell * len(words), header_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, w in enumerate(words):
        draw.text((label_w + j * cell + GRID_CELL // 2, header_h // 2), w, fill="black", font=font, anchor="mm")
    for i, ((_, label), row_maps) in enumerate(zip(rows, by_row, strict=True)):
        y = header_h + i * cell
        draw.text((4, y + GRID_CELL // 2), label, fill="black", font=font, anchor="lm")
        for j, w in enumerate(words):
            grid.paste(overlay(sample, row_maps[w], alpha, GRID_CELL), (label_w + j * cell, y))
    return grid


def mark(image: Image.Image, pixel: tuple[int, int], source_size: tuple[int, int]) -> Image.Image:
    """Draw a ring around source pixel (y, x) on an upscaled copy."""
    H, W = source_size
    sy, sx = image.height / H, image.width / W
    cy, cx = (pixel[0] + 0.5) * sy, (pixel[1] + 0.5) * sx
    r = max(4.0, 0.7 * max(sx, sy))
    out = image.copy()
    draw = ImageDraw.Draw(out)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(0, 255, 255), width=2)
    return out


@on_torch_thread
def render_self_attention(result: GenerationResult | None, image: float, time_bin: float, pixel_y: float,
                          pixel_x: float, alpha: float):
    """Where the pixel (y, x) of the sample looked, per self-attention layer (and their mean)."""
    maps, image = attention_of(result, image)
    opts = map_options(maps, ALL_LAYERS, time_bin, MEAN_HEADS)
    H, W = maps.image_size
    if pixel_y is None or pixel_x is None or not (0 <= pixel_y < H and 0 <= pixel_x < W):
        raise gr.Error(f"pixel (y, x) must lie inside the {H}×{W} image, got ({pixel_y}, {pixel_x}).")
    if alpha is None or not 0 <= alpha <= 1:
        raise gr.Error(f"overlay alpha must be between 0 and 1, got {alpha}.")
    pixel = (int(pixel_y), int(pixel_x))
    sample = result.images[image]
    target = mark(upscale(sample), pixel, (H, W))
    layers = maps.layers("self")
    if not layers:
        return target, []
    per_layer = {n: maps.self_attention(image, n, pixel, opts["bins"], normalize="absolute") for n in layers}
    mean = normalize_maps({"mean": torch.stack(list(per_layer.values())).mean(0)}, "minmax")["mean"]
    bins = opts["bins"] if opts["bins"] is not None else range(maps.store.num_bins)
    steps = [s + 1 for b in bins for s in maps.store.self_attention_steps(b)]  # 1-based, as the UI counts
    when = f"step {steps[0]}" if len(steps) == 1 else "steps " + ", ".join(map(str, steps))
    items = [(f"all layers (mean) · {when}", mean)] + [
        (f"{n} · {'×'.join(map(str, maps.layer_size(n)))}", normalize_maps({n: m}, "minmax")[n])
        for n, m in per_layer.items()]
    gallery = [(mark(overlay(sample, m, alpha, DISPLAY), pixel, (H, W)), label) for label, m in items]
    return target, gallery


def click_pixel(result: GenerationResult | None, image: float, evt: gr.SelectData) -> tuple[int, int]:
    """A click on the upscaled sample (x, y in display pixels) → the sample's pixel (y, x)."""
    maps, image = attention_of(result, image)
    H, W = maps.image_size
    dw, dh = display_size((W, H), DISPLAY)
    x, y = evt.index
    return min(H - 1, int(y * H / dh)), min(W - 1, int(x * W / dw))


def gallery_index(evt: gr.SelectData) -> int:
    return evt.index


_EXPORT_ROOT: Path | None = None
EXPORT_TTL_S = 3600


@on_torch_thread
def export_maps(result: GenerationResult | None) -> str:
    """maps.json + maps.npz + overlay PNGs of every image and word, zipped."""
    global _EXPORT_ROOT
    maps, _ = attention_of(result, 0)
    if _EXPORT_ROOT is None:  # one folder per process, removed at exit
        _EXPORT_ROOT = Path(tempfile.mkdtemp(prefix="look-inside-exports-"))
        atexit.register(shutil.rmtree, _EXPORT_ROOT, True)
    for old in _EXPORT_ROOT.iterdir():  # Gradio serves its own copy of the zip; ours can go after a while
        if time.time() - old.stat().st_mtime > EXPORT_TTL_S:
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(dir=_EXPORT_ROOT))
    maps.export(folder / "maps", result.images, size=DISPLAY)
    return shutil.make_archive(str(folder / f"attention-maps-seed{result.seed}"), "zip", folder / "maps")


def maps_gallery(label: str, columns: int, **kwargs) -> gr.Gallery:
    """A gallery of 256 px overlays: fixed columns (a 2-word prompt must not blow maps up), exact PNG pixels."""
    return gr.Gallery(label=label, columns=columns, fit_columns=False, height="auto", format="png",
                      object_fit="contain", elem_classes="pixelated", **kwargs)


# -- the app --------------------------------------------------------------------------------------
def build_demo(pipe: TextToImagePipeline) -> gr.Blocks:
    """The Blocks over one loaded pipeline. Launch it yourself (theme=THEME, css=CSS), as main() does."""
    cross_layers = [n for n, b in pipe.unet.attention_layers.items() if b.kind == "cross"]
    n_heads = min(pipe.unet.attention_layers[n].num_heads for n in cross_layers)
    shapes = pipe.layout_grammar == SHAPES_GRAMMAR
    examples = example_prompts(pipe.captions, pipe.layout_grammar, max_chars=MAX_PROMPT_CHARS)
    layout_off = "" if shapes else f" ({layout_off_note(pipe.captions)})"

    with gr.Blocks(title="Look Inside Diffusion", delete_cache=(EXPORT_TTL_S, EXPORT_TTL_S)) as demo:
        result = gr.State(None)  # the last GenerationResult of this session: the explorer re-renders from it
        gr.Markdown("# Look Inside Diffusion", elem_id="title")
        gr.Markdown("A small text-to-image diffusion model you can look inside: type a prompt, then see "
                    "where every word looked, per layer, timestep and head, and where every pixel looked.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", placeholder=examples[0] if examples else "describe the image",
                                        max_lines=2, scale=5, autofocus=True, elem_id="prompt",
                                        info=f"Emphasis: (word:1.5) strengthens a word's cross-attention, "
                                             f"(word:0.5) weakens it (weights 0–{MAX_WEIGHT:g}).")
                    run = gr.Button("Generate", variant="primary", scale=1, min_width=110)
                if examples:
                    gr.Examples(examples, inputs=[prompt], cache_examples=False, label="Examples")
                else:
                    gr.Markdown(f"No examples: this model's folder has no summary of its training captions "
                                f"({CAPTIONS_FILE}). Describe an image in the words it was trained on; 'What this "
                                f"model knows' lists its tokenizer's words.", elem_classes="small-note")
                with gr.Accordion("Advanced settings", open=False):
                    negative_prompt = gr.Textbox("", label="Negative prompt", max_lines=2,
                                                 info="Replaces the empty prompt of classifier-free guidance; "
                                                      "its maps are in the explorer.")
                    with gr.Row():
                        steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                        guidance = gr.Slider(0, MAX_GUIDANCE, value=4.0, step=0.5, label="Guidance scale")
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                        randomize = gr.Checkbox(True, label="Randomize seed")
                    with gr.Row():
                        sampler = gr.Dropdown(sorted(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
                        num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images")
                    relation_guidance = gr.Slider(
                        0, MAX_RELATION_GUIDANCE, value=RELATION_GUIDANCE, step=5, label="Relation guidance",
                        info="In 'A above B', 'A to the left of B' (or 'A over B', 'A at the top and B at the "
                             "bottom' …), nudge the first steps' noise so that A's words look above (left of) B's; 0 "
                             f"turns it off. Other prompts are not touched.{layout_off}")
                    object_guidance = gr.Slider(
                        0, MAX_OBJECT_GUIDANCE, value=OBJECT_GUIDANCE, step=5, label="Object guidance",
                        info="In 'A and B' (two objects or more, no relation), nudge the first steps' noise so "
                             "that every object's words are looked at somewhere (Attend-and-Excite), so none is "
                             "left out; in 'three X', so that X's words look at three places, not four. 0 turns "
                             f"it off. Other prompts are not touched.{layout_off}")
                with gr.Accordion("What this model knows", open=False):
                    gr.Markdown(knows_note(pipe))
                with gr.Accordion("Model card", open=False):
                    gr.Markdown(model_card_text(pipe))
            with gr.Column(scale=6):
                gallery = gr.Gallery(label="Samples", columns=2, height=SAMPLES_WIDTH + 40,
                                     format="png", object_fit="contain", allow_preview=False,
                                     elem_classes="pixelated", elem_id="samples")
                status = gr.Markdown("", label="Status", elem_id="status")

        gr.Markdown("## Attention explorer")
        placeholder = gr.Markdown("*Generate images to explore their attention maps.*")
        with gr.Column(visible=False) as explorer:
            with gr.Row():
                image = gr.Dropdown([(f"image {i + 1}", i) for i in range(MAX_IMAGES)], value=0, label="Image")
                layer = gr.Dropdown([("all layers (mean)", ALL_LAYERS)] + [(n, n) for n in cross_layers],
                                    value=ALL_LAYERS, label="Cross-attention layer")
                head = gr.Dropdown([("mean of heads", MEAN_HEADS)] + [(f"head {h + 1}", h) for h in range(n_heads)],
                                   value=MEAN_HEADS, label="Head")
                time_bin = gr.Slider(0, 4, value=0, step=1, label="Timestep bin")
            with gr.Row():
                normalization = gr.Radio(NORMALIZATIONS, value="minmax", label="Normalisation", scale=3)
                with gr.Column(scale=2, min_width=200):
                    special = gr.Checkbox(False, label="Show start/end tokens",
                                          info="CLIP's start token soaks up most attention")
                    negative = gr.Checkbox(False, label="Negative prompt's maps")
                alpha = gr.Slider(0, 1, value=0.6, step=0.05, label="Overlay alpha", scale=2)
            note = gr.Markdown(label="Shown")
            with gr.Tabs():
                with gr.Tab("Words"):
                    words = maps_gallery("Where each word looked", 5, elem_id="word-maps")
                    gr.Markdown(GROUNDED_WORDS_NOTE if shapes else WORDS_NOTE, elem_classes="small-note")
                with gr.Tab("Heads of one word"):
                    word = gr.Dropdown([], value="", label="Word", allow_custom_value=True,
                                       info="Words change with the prompt, the negative-prompt and start/end toggles")
                    heads = maps_gallery("Each attention head", 4)
                with gr.Tab("Layers × words"):
                    grid = gr.Image(label="Layer × word grid", format="png",
                                    interactive=False, elem_classes="pixelated", buttons=["download", "fullscreen"])
                with gr.Tab("Self-attention"):
                    gr.Markdown("Click a pixel of the sample to see which positions it attended to in each "
                                "self-attention layer (the timestep bin and alpha above apply). Self-attention "
                                "is recorded at the middle step of each bin (all steps: their mean), as "
                                "recording it at every step would slow sampling by a quarter.")
                    with gr.Row():
                        with gr.Column(scale=2, min_width=260):
                            target = gr.Image(label="Click a pixel", format="png", interactive=False,
                                              elem_classes="pixelated", elem_id="self-target")
                            with gr.Row():
                                pixel_y = gr.Number(0, label="Pixel y (row)", precision=0, minimum=0)
                                pixel_x = gr.Number(0, label="Pixel x (column)", precision=0, minimum=0)
                        self_maps = maps_gallery("Where that pixel looked", 4, scale=5)
                with gr.Tab("Export"):
                    gr.Markdown("A zip of the last run: `maps.json` (prompts, tokens, layers, bins), `maps.npz` "
                                "(raw per-layer, per-bin maps and per-word maps of every image) and an overlay "
                                "PNG per image and word.")
                    export = gr.Button("Export maps (zip)")
                    download = gr.File(label="Download")

        gen_inputs = [prompt, negative_prompt, steps, guidance, seed, randomize, sampler, num_images, relation_guidance,
                      object_guidance]
        attention_inputs = [result, image, layer, time_bin, head, normalization, special, negative, alpha, word]
        attention_outputs = [words, word, heads, grid, note]
        self_inputs = [result, image, time_bin, pixel_y, pixel_x, alpha]

        # Named parameters: they are the API's parameter names. Gradio injects progress via the default.
        def on_generate(prompt, negative_prompt, steps, guidance, seed, randomize_seed, sampler, num_images,
                        relation_guidance, object_guidance, progress=gr.Progress()):  # noqa: B008
            return generate(pipe, prompt, negative_prompt, steps, guidance, seed, randomize_seed, sampler,
                            num_images, progress=progress, relation_guidance=relation_guidance,
                            object_guidance=object_guidance)

        def center_pixel(res: GenerationResult) -> tuple[int, int]:
            H, W = res.attention.image_size
            return H // 2, W // 2

        # Check first, in a step with no outputs: a bad request only raises a toast and the last samples
        # stay on screen (an error in generate itself blanks the gallery). generate() checks again for
        # API callers, who skip this step. Queued (unqueued errors show no toast), in its own group.
        checked = gr.on([prompt.submit, run.click], check_inputs, gen_inputs, None, api_visibility="private",
                        concurrency_id="checks", concurrency_limit=4, show_progress="hidden")
        generated = checked.success(on_generate, gen_inputs, [gallery, seed, status, result], api_name="generate",
                                    concurrency_id="sampling")
        word_inputs = [result, image, special, negative, word]
        explorer_controls = [gallery, explorer, placeholder, image, layer, head, time_bin]
        after = generated.success(explorer_choices, [result], explorer_controls, api_visibility="private")
        after = after.success(center_pixel, [result], [pixel_y, pixel_x], api_visibility="private")
        after = after.success(word_choices, word_inputs, word, api_visibility="private")
        after.success(render_attention, attention_inputs, attention_outputs, api_visibility="private")
        after.success(render_self_attention, self_inputs, [target, self_maps], api_visibility="private")

        # The explorer never samples: its events run in their own group, so they don't wait behind
        # another user's sampling run (a re-render takes well under a second at 32 px).
        light = {"concurrency_id": "explorer", "concurrency_limit": 2, "show_progress": "minimal"}
        private = {"api_visibility": "private", **light}
        # Controls that change which words there are refresh the word selector first.
        picked = gallery.select(gallery_index, None, image, **private)
        toggled = gr.on([image.input, special.input, negative.input], word_choices, word_inputs, word, **private)
        for changed in [picked.success(word_choices, word_inputs, word, **private), toggled]:
            changed.success(render_attention, attention_inputs, attention_outputs, **private)
        picked.success(render_self_attention, self_inputs, [target, self_maps], **private)
        gr.on([c.input for c in (layer, time_bin, head, normalization, alpha, word)],
              render_attention, attention_inputs, attention_outputs, api_name="attention", **light)
        gr.on([image.input, time_bin.input, alpha.input, pixel_y.submit, pixel_x.submit],
              render_self_attention, self_inputs, [target, self_maps], api_name="self_attention", **light)
        target.select(click_pixel, [result, image], [pixel_y, pixel_x], **private).success(
            render_self_attention, self_inputs, [target, self_maps], **private)
        export.click(export_maps, [result], download, api_name="export_maps", **light)

    # One sampling run at a time on 2 vCPUs; max_size bounds how many wait.
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


@on_torch_thread
def load_pipeline(model: str, dtype: str = "auto") -> TextToImagePipeline:
    """A pipeline folder, or a hub id (downloaded once; offline it must already be cached)."""
    if Path(model).is_dir():
        return TextToImagePipeline.from_pretrained(model, dtype=dtype)
    from huggingface_hub import snapshot_download  # only needed for hub ids

    return TextToImagePipeline.from_pretrained(snapshot_download(model), dtype=dtype)


@on_torch_thread
def warm_up(pipe: TextToImagePipeline) -> None:
    pipe("a red circle", num_images=4, steps=2, seed=0, record_attention=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="pipeline folder or hub id (default: %(default)s)")
    parser.add_argument("--host", default=None, help="address to bind, e.g. 0.0.0.0 (default: Gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free)")
    parser.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="U-Net compute type; auto = bf16 where this CPU runs it fast, else fp32 (default: auto)")
    args = parser.parse_args(argv)

    looks_local = Path(args.model).exists() or args.model.startswith((".", "/", "~")) or args.model == DEFAULT_MODEL
    # weights/default ships the text encoder first; its U-Net arrives once trained.
    if looks_local and not (Path(args.model) / "unet").is_dir():
        sys.exit(
            f"No trained model at {args.model!r} (no unet/ in it). Train one and point the app at its export:\n"
            f"    python train.py --data shapes --caption-column captions --out runs/default --steps 8000\n"
            f"    python app.py --model runs/default/pipeline\n"
            f"or serve a model from the Hugging Face Hub: python app.py --model OWNER/NAME"
        )
    try:
        pipe = load_pipeline(args.model, args.dtype)
    except Exception as e:  # a CLI: one clear line beats a traceback through three libraries
        sys.exit(f"Could not load the model {args.model!r}: {e}")
    _COMPUTE.submit(torch.set_num_threads, os.cpu_count() or 1).result()
    # The first sampling run builds the CPU kernels for its shapes (~1.5 s here). Do that for the default
    # settings while Gradio builds and starts the server: queued on the torch thread, the first request
    # waits for it.
    _COMPUTE.submit(warm_up, pipe)
    build_demo(pipe).launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS)


if __name__ == "__main__":
    main()
