"""The attention explorer's pictures: what a run's AttentionMaps show, drawn for people.

A view is chosen in the explorer's (and the API's) terms: an image of the run (0 first), a cross-attention
layer or "all" (`ALL_LAYERS`: their mean), a timestep bin (0: all steps, else bin k − 1 of `maps.bins`), a head
or −1 (`MEAN_HEADS`: their mean), a normalisation of diffusion/maps.py. `map_options` turns those into
AttentionMaps' arguments; `word_views` and `self_attention_views` return galleries of (overlay, caption) and a
line saying what is shown. Samples are 16–32 px: everything is shown nearest-upscaled to `DISPLAY` pixels
(`upscale`), and a click on such a picture maps back to a sample pixel (`display_to_pixel`).
"""

import torch
from PIL import Image, ImageDraw, ImageFont

from diffusion.maps import AttentionMaps, display_size, normalize_maps, overlay
from diffusion.pipeline import GenerationResult

DISPLAY = 256  # samples and overlays are shown at this many pixels on the longer side
GRID_CELL = 96  # one cell of the layer × word grid
ALL_LAYERS = "all"
MEAN_HEADS = -1
# How each normalisation of AttentionMaps.word_maps is named to people, in the order they are offered.
NORMALIZATION_LABELS = {
    "minmax": "per word (min–max)",
    "absolute": "absolute (compare words)",
    "tokens": "share per pixel (which word wins)",
}
FUNCTION_WORDS = {"a", "an", "the", "of", "to", "on", "in", "at", "and", "<start>", "<end>"}  # not the focus


def upscale(image: Image.Image, size: int = DISPLAY) -> Image.Image:
    """Nearest-upscaled so the longer side is `size`: every sample pixel stays a crisp square."""
    return image.resize(display_size(image.size, size), Image.NEAREST)


def steps_label(steps: range) -> str:
    """Sampling steps, 1-based for people: "step 3" or "steps 1–5"."""
    return f"step {steps.start + 1}" if len(steps) == 1 else f"steps {steps.start + 1}–{steps.stop}"


def max_heads(maps: AttentionMaps, layer: str) -> int:
    """Heads a layer choice has; "all layers" averages head k over layers, so the smallest count."""
    names = maps.layers("cross") if layer == ALL_LAYERS else [layer]
    return min(maps.num_heads(n) for n in names)


def map_options(layer: str, time_bin: int, head: int) -> dict:
    """The explorer's choices as AttentionMaps' arguments (layer, bins, head; None for all or the mean)."""
    return {"layer": None if layer == ALL_LAYERS else layer,
            "bins": None if time_bin == 0 else [time_bin - 1],
            "head": None if head == MEAN_HEADS else head}


def focus(words: list[str], word: str | None) -> str | None:
    """The word of the per-head view: kept while the prompt has it, else the first content word."""
    if word in words or not words:
        return word if words else None
    return next((w for w in words if w not in FUNCTION_WORDS), words[0])


def word_views(result: GenerationResult, image: int, layer: str, time_bin: int, head: int, normalization: str,
               special_tokens: bool, negative: bool, alpha: float, word: str | None) -> tuple:
    """Where each word of one image's prompt looked, for the chosen layer, bin and head.

    Returns (words, word, heads, grid, note): an overlay per word, captioned with it; the word of the per-head
    view (`focus`); that word's overlay per head; the layer × word grid; a line saying what is shown. A prompt
    with no words to show gives ([], None, [], None, a line saying what to tick or set instead).
    """
    maps = result.attention
    opts = map_options(layer, time_bin, head)
    sample = result.images[image]
    common = {"negative": negative, "include_special": special_tokens, "normalize": normalization}
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


def layer_word_grid(maps: AttentionMaps, sample: Image.Image, image: int, opts: dict, common: dict,
                    alpha: float, all_layers_only: bool = False) -> Image.Image:
    """One picture: a row per cross-attention layer (plus all layers; or that row alone), a column per word.

    opts: map_options' layer, bins and head (the layer is set per row); common: word_maps' negative,
    include_special and normalize."""
    rows = [(ALL_LAYERS, "all layers")] + ([] if all_layers_only else [
        (n, f"{n.removesuffix('.cross_attn')} {'x'.join(map(str, maps.layer_size(n)))}") for n in maps.layers("cross")])
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


def word_strip(result: GenerationResult, alpha: float = 0.6) -> Image.Image:
    """The first image's word overlays in one row (all layers, all steps, mean of heads, min–max)."""
    common = {"negative": False, "include_special": False, "normalize": "minmax"}
    return layer_word_grid(result.attention, result.images[0], 0, map_options(ALL_LAYERS, 0, MEAN_HEADS), common,
                           alpha, all_layers_only=True)


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


def self_attention_views(result: GenerationResult, image: int, time_bin: int, pixel: tuple[int, int],
                         alpha: float) -> tuple[Image.Image, list]:
    """Where sample pixel (y, x) of one image looked, per self-attention layer and in their mean.

    Returns the upscaled sample with the pixel ringed, and (overlay, caption) per layer after their mean's. Each
    layer's map is min–max scaled on its own; the mean is of the layers' maps each scaled to a peak of 1, then
    min–max scaled. Self-attention is recorded at chosen steps of each bin: the mean's caption says which
    ("all layers (mean) · steps 1, 2").
    """
    maps = result.attention
    bins = map_options(ALL_LAYERS, time_bin, MEAN_HEADS)["bins"]
    H, W = maps.image_size
    sample = result.images[image]
    target = mark(upscale(sample), pixel, (H, W))
    layers = maps.layers("self")
    if not layers:
        return target, []
    per_layer = {n: maps.self_attention(image, n, pixel, bins, normalize="absolute") for n in layers}
    mean = normalize_maps({"mean": torch.stack(list(per_layer.values())).mean(0)}, "minmax")["mean"]
    steps = [s + 1 for b in (bins if bins is not None else range(maps.store.num_bins))
             for s in maps.store.self_attention_steps(b)]  # 1-based, as people count
    when = f"step {steps[0]}" if len(steps) == 1 else "steps " + ", ".join(map(str, steps))
    items = [(f"all layers (mean) · {when}", mean)] + [
        (f"{n} · {'×'.join(map(str, maps.layer_size(n)))}", normalize_maps({n: m}, "minmax")[n])
        for n, m in per_layer.items()]
    gallery = [(mark(overlay(sample, m, alpha, DISPLAY), pixel, (H, W)), label) for label, m in items]
    return target, gallery


def display_to_pixel(point: tuple[int, int], image_size: tuple[int, int], size: int = DISPLAY) -> tuple[int, int]:
    """A point (x, y) on the upscaled picture of an (H, W) sample → the sample's pixel (y, x)."""
    H, W = image_size
    dw, dh = display_size((W, H), size)
    x, y = point
    return min(H - 1, int(y * H / dh)), min(W - 1, int(x * W / dw))
