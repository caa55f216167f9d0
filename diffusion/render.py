"""The attention explorer's pictures: what a run's AttentionMaps show, drawn for people.

A view is chosen in the explorer's (and the API's) terms: an image of the run (0 first), a cross-attention
layer or "all" (`ALL_LAYERS`: their mean), a timestep bin (0: all steps, else bin k − 1 of `maps.bins`), a head
or −1 (`MEAN_HEADS`: their mean), a normalisation of diffusion/maps.py. `map_options` turns those into
AttentionMaps' arguments; `word_views` and `self_attention_views` return galleries of (overlay, caption) and a
line saying what is shown. Samples are 16–32 px: everything is shown nearest-upscaled to `DISPLAY` pixels
(`upscale`), and a click on such a picture maps back to a sample pixel (`display_to_pixel`).

Two runs with the same seeds (two models, or two prompts on one model) are compared word by word: `align_words`
puts a word of both prompts in one column, `compared_maps` normalises the two runs' word maps together, and
`comparison_view` draws rows A, B and their difference, with a line on which shared words moved most.
"""

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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


# -- comparing two runs -----------------------------------------------------------------------------------------
# A diverging colormap for differences (ColorBrewer's RdBu, 5 control points, blue → white → red) in 256 entries.
_RDBU = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]], np.float32)
DIVERGING = np.stack([np.interp(np.linspace(0, 4, 256), np.arange(5), _RDBU[:, c]) for c in range(3)], 1)
MOVED_WORDS = 3  # the summary line names this many shared words, the most moved first


@dataclass
class Comparison:
    """Two runs with the same seeds, and what each side is called in the pictures ("base", "a red circle")."""

    a: GenerationResult
    b: GenerationResult
    label_a: str
    label_b: str


def word_text(label: str) -> str:
    """A word map's label without its repeat number: "a #2" → "a"."""
    return re.sub(r" #\d+$", "", label)


def align_words(a: list[str], b: list[str]) -> list[tuple[str | None, str | None]]:
    """Two prompts' word labels in columns: (label in A, label in B), None where one prompt lacks the word.

    The words of both are a longest common subsequence of the two lists, compared by their text ("a #2" of one
    prompt can meet "a" of the other), so shared words stay in order; a word of one prompt alone gets its own
    column, between the shared words around it (A's before B's)."""
    ta, tb = [word_text(w) for w in a], [word_text(w) for w in b]
    n, m = len(a), len(b)
    lcs = [[0] * (m + 1) for _ in range(n + 1)]  # lcs[i][j]: the common subsequence's length of a[i:] and b[j:]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            lcs[i][j] = lcs[i + 1][j + 1] + 1 if ta[i] == tb[j] else max(lcs[i + 1][j], lcs[i][j + 1])
    columns, i, j = [], 0, 0
    while i < n and j < m:
        if ta[i] == tb[j]:
            columns.append((a[i], b[j]))
            i, j = i + 1, j + 1
        elif lcs[i + 1][j] >= lcs[i][j + 1]:
            columns.append((a[i], None))
            i += 1
        else:
            columns.append((None, b[j]))
            j += 1
    return columns + [(w, None) for w in a[i:]] + [(None, w) for w in b[j:]]


def common_size(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) both runs' maps are compared at: the larger of each side."""
    return max(a[0], b[0]), max(a[1], b[1])


def resized(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An (H, W) map at another (H, W), bilinear (as maps are upsampled from their layers)."""
    if tuple(heat.shape) == tuple(size):
        return heat
    return F.interpolate(heat[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def compared_maps(a: AttentionMaps, b: AttentionMaps, image: int, normalization: str) -> tuple:
    """Image `image`'s word maps of two runs, aligned and normalised together.

    Returns (columns, maps_a, maps_b, size): align_words' columns, each run's {word: (H, W) map} at the common
    size (common_size), normalised so the rows compare: "absolute" divides both rows by the largest value of
    either; "minmax" scales each map on its own (shape only); "tokens" is each run's share per pixel (0…1 in
    both rows already)."""
    size = common_size(a.image_size, b.image_size)
    raw_a = {w: resized(m, size) for w, m in a.word_maps(image, normalize=None).items()}
    raw_b = {w: resized(m, size) for w, m in b.word_maps(image, normalize=None).items()}
    if normalization == "tokens":  # a share of the run's own words: per row
        maps_a, maps_b = normalize_maps(raw_a, "tokens"), normalize_maps(raw_b, "tokens")
    else:
        both = normalize_maps({**{("A", w): m for w, m in raw_a.items()}, **{("B", w): m for w, m in raw_b.items()}},
                              normalization)
        maps_a, maps_b = {w: both["A", w] for w in raw_a}, {w: both["B", w] for w in raw_b}
    return align_words(list(raw_a), list(raw_b)), maps_a, maps_b, size


def map_differences(columns: list, maps_a: dict, maps_b: dict) -> dict[tuple[str, str], torch.Tensor]:
    """{(word in A, word in B): A's map − B's map} for each shared word: > 0 where A looked more."""
    return {(wa, wb): maps_a[wa] - maps_b[wb] for wa, wb in columns if wa is not None and wb is not None}


def diverging(diff: torch.Tensor, scale: float, size: int = GRID_CELL) -> Image.Image:
    """A difference map in the diverging colormap: −scale blue, 0 white, +scale red; the longer side `size`."""
    H, W = diff.shape
    w, h = display_size((W, H), size)
    d = F.interpolate(diff.float()[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    idx = ((d / max(scale, 1e-12)).clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(DIVERGING[idx].astype(np.uint8))


def moved_words(cmp: Comparison, image: int, columns: list, diffs: dict, size: tuple[int, int]) -> list[tuple]:
    """(column name, mean |A − B| of the shown maps, centre shift in pixels of the common size) per shared word,
    the most moved first. Centres are AttentionMaps.word_summary's, scaled to the common size."""
    cents = []
    for maps in (cmp.a.attention, cmp.b.attention):
        H, W = maps.image_size
        cents.append({w: (c["centre"][0] * size[0] / H, c["centre"][1] * size[1] / W)
                      for w, c in maps.word_summary(image).items()})
    out = [(column_name(wa, wb), d.abs().mean().item(),
            float(np.hypot(cents[0][wa][0] - cents[1][wb][0], cents[0][wa][1] - cents[1][wb][1])))
           for (wa, wb), d in diffs.items()]
    return sorted(out, key=lambda row: -row[1])


def column_name(wa: str | None, wb: str | None) -> str:
    """A column's header: the word, or "a #2 / a" where its labels differ."""
    return wa if wb is None or wa == wb else wb if wa is None else f"{wa} / {wb}"


def comparison_view(cmp: Comparison, image: int, normalization: str, alpha: float = 0.6) -> tuple[Image.Image, str]:
    """Image `image` of both runs, word by word: one picture with a column per word (shared words in one column,
    align_words), rows A and B (each word's overlay on its own run's sample; an empty cell where a prompt lacks
    the word) and A − B for shared words (diverging: red where A looked more, blue where B did, one scale for
    the row, in its legend), and a note saying what is shown and which shared words moved most."""
    a, b = cmp.a.attention, cmp.b.attention
    if not 0 <= image < min(a.num_images, b.num_images):
        raise ValueError(f"image must be from 0 to {min(a.num_images, b.num_images) - 1}: the comparison made "
                         f"{a.num_images} images per side; got {image}.")
    columns, maps_a, maps_b, size = compared_maps(a, b, image, normalization)
    diffs = map_differences(columns, maps_a, maps_b)
    scale = max((d.abs().max().item() for d in diffs.values()), default=0.0)
    grid = _comparison_grid(cmp, image, columns, maps_a, maps_b, diffs, scale, alpha)

    lines = [f"Image {image + 1} · seed {cmp.a.seeds[image]} · A: {cmp.label_a} · B: {cmp.label_b} · "
             f"{NORMALIZATION_LABELS[normalization]}, "
             + ("each row on its own (shares)" if normalization == "tokens" else "both rows on one scale")
             + (f" · A − B: red where A looked more, blue where B did; full colour = ±{scale:.3g}" if diffs else "")]
    if cmp.a.prompts[image] == cmp.b.prompts[image]:
        lines[0] += f' · prompt "{cmp.a.prompts[image]}" on both sides'
    if a.image_size != b.image_size:
        lines.append(f"A's maps are {'×'.join(map(str, a.image_size))} and B's {'×'.join(map(str, b.image_size))}: "
                     f"both resized to {'×'.join(map(str, size))} (bilinear) to compare.")
    moved = moved_words(cmp, image, columns, diffs, size)
    if moved:
        lines.append("Moved most (mean |A − B| of the shown maps; shift of the attention's centre): " + ", ".join(
            f"**{w}** {l1:.3f} ({shift:.1f} px)" for w, l1, shift in moved[:MOVED_WORDS]) + ".")
    else:
        lines.append("The prompts share no word: nothing to subtract.")
    only_a, only_b = [wa for wa, wb in columns if wb is None], [wb for wa, wb in columns if wa is None]
    if only_a or only_b:
        lines.append(" · ".join(([f"only in A: {', '.join(only_a)}"] if only_a else [])
                                + ([f"only in B: {', '.join(only_b)}"] if only_b else [])))
    return grid, "\n\n".join(lines)


def _comparison_grid(cmp: Comparison, image: int, columns: list, maps_a: dict, maps_b: dict, diffs: dict,
                     scale: float, alpha: float) -> Image.Image:
    """The picture of comparison_view: a header of words, rows A, B and A − B, and the difference's legend."""
    font = ImageFont.load_default(size=13)  # Pillow's bundled font (no "×" or "−" glyph: "x", "-" below)
    label_w, header_h, legend_h, pad = 150, 24, 34, 4
    cell = GRID_CELL + pad
    width = label_w + cell * max(1, len(columns))
    grid = Image.new("RGB", (max(width, label_w + 300), header_h + 3 * cell + legend_h), "white")
    draw = ImageDraw.Draw(grid)
    samples = (cmp.a.images[image], cmp.b.images[image])
    rows = [(f"A: {cmp.label_a}", 0), (f"B: {cmp.label_b}", 1), ("A - B", 2)]
    for i, (label, _) in enumerate(rows):
        draw.text((4, header_h + i * cell + GRID_CELL // 2), _clip(label, 20), fill="black", font=font, anchor="lm")
    for j, (wa, wb) in enumerate(columns):
        x = label_w + j * cell
        draw.text((x + GRID_CELL // 2, header_h // 2), _clip(column_name(wa, wb), 13), fill="black", font=font,
                  anchor="mm")
        cells = [overlay(samples[0], maps_a[wa], alpha, GRID_CELL) if wa is not None else None,
                 overlay(samples[1], maps_b[wb], alpha, GRID_CELL) if wb is not None else None,
                 diverging(diffs[wa, wb], scale) if (wa, wb) in diffs else None]
        for i, picture in enumerate(cells):
            y = header_h + i * cell
            if picture is None:  # the word is not in this prompt
                draw.rectangle((x, y, x + GRID_CELL - 1, y + GRID_CELL - 1), fill=(235, 235, 235))
                draw.text((x + GRID_CELL // 2, y + GRID_CELL // 2), "-", fill="gray", font=font, anchor="mm")
            else:
                grid.paste(picture, (x, y))
    # Legend: the difference's colormap from −scale (B looked more) to +scale (A looked more).
    y, bar_w = header_h + 3 * cell + 4, 200
    bar = Image.fromarray(np.repeat(DIVERGING[None, np.linspace(0, 255, bar_w).round().astype(int)], 10, 0)
                          .astype(np.uint8))
    grid.paste(bar, (label_w + 50, y))
    draw.text((label_w + 46, y + 5), f"B more -{scale:.2g}", fill="black", font=font, anchor="rm")
    draw.text((label_w + 54 + bar_w, y + 5), f"+{scale:.2g} A more", fill="black", font=font, anchor="lm")
    return grid


def _clip(text: str, chars: int) -> str:
    """Text cut to `chars` characters with an ellipsis, to fit a label."""
    return text if len(text) <= chars else text[: chars - 2] + ".."
