"""AttentionMaps: what the recorded attention says, per word, token, layer, timestep bin and head.

Shape legend: H, W image size; h, w a layer's size; N = h·w; L tokens; K maps.

Aggregation follows DAAM: each layer's (N, L) map is reshaped to (L, h, w) with the layer's stored
size (never sqrt(N)), upsampled to the image size, averaged over heads, steps and layers. We average
rather than sum so that "absolute" values stay attention probabilities (0…1). A word's map is the sum
of its sub-tokens' maps: the share of attention that went to the word.

Rows of the store: cross-attention holds 2B rows (B negative/empty prompts, then B prompts),
self-attention the B prompt rows only (see TextToImagePipeline).
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unet import AttentionStore

NORMALIZATIONS = ("minmax", "absolute", "tokens")
START, END = "<start>", "<end>"

# A perceptually ordered colormap (inferno, 9 control points) interpolated to 256 entries.
_INFERNO = np.array([
    [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
    [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
], dtype=np.float32)
COLORMAP = np.stack([np.interp(np.linspace(0, 8, 256), np.arange(9), _INFERNO[:, c]) for c in range(3)], 1)


class AttentionMaps:
    """Maps of one pipeline call.

    Args:
        store: the AttentionStore filled during sampling.
        encoding: the text encoder's output for [negatives; prompts] (EncodedPrompts).
        num_images: B.  image_size: (H, W).
        prompts, negative_prompts: per image.  seed, sampler: for export metadata.
    """

    def __init__(self, store: AttentionStore, encoding, num_images: int, image_size: tuple[int, int],
                 prompts: list[str], negative_prompts: list[str], seed: int, sampler: str):
        self.store = store
        self.encoding = encoding
        self.num_images = num_images
        self.image_size = tuple(image_size)
        self.prompts = prompts
        self.negative_prompts = negative_prompts
        self.seed = seed
        self.sampler = sampler

    # -- what was recorded -------------------------------------------------------------------------
    def layers(self, kind: str = "cross") -> list[str]:
        """Recorded layer names of a kind, in the order the U-Net runs them."""
        return self.store.layer_names(kind)

    def layer_size(self, name: str) -> tuple[int, int]:
        return self.store.layers[name].size

    def num_heads(self, name: str) -> int:
        return self.store.layers[name].heads

    @property
    def bins(self) -> list[range]:
        """The sampling steps summed into each timestep bin."""
        return [self.store.bin_steps(b) for b in range(self.store.num_bins)]

    def _row(self, image: int, negative: bool) -> int:
        if not 0 <= image < self.num_images:
            raise IndexError(f"image {image} is out of range: this call made {self.num_images} images.")
        return image if negative else self.num_images + image

    def tokens(self, image: int, negative: bool = False) -> list[str]:
        """Token strings of an image's prompt, start/end tokens shown as <start>/<end>."""
        row = self._row(image, negative)
        toks = list(self.encoding.tokens[row])
        ids = self.encoding.word_ids[row]
        return [START if i == 0 else END if wid is None else t
                for i, (t, wid) in enumerate(zip(toks, ids, strict=True))]

    def words(self, image: int, negative: bool = False) -> list[str]:
        return list(self.encoding.words[self._row(image, negative)])

    # -- maps --------------------------------------------------------------------------------------
    def token_maps(self, image: int, layer: str | None = None, bins: list[int] | None = None,
                   head: int | None = None, negative: bool = False) -> torch.Tensor:
        """Raw cross-attention per token, (L, H, W): mean over heads (or one head), steps in `bins`
        (all if None) and layers (one if `layer` is given), upsampled to the image size."""
        row = self._row(image, negative)
        n_tokens = len(self.encoding.tokens[row])
        names = [layer] if layer is not None else self.layers("cross")
        total = torch.zeros(n_tokens, *self.image_size)
        for name in names:
            if head is None:
                m = self.store.mean(name, bins)[row]  # (N, L)
            else:
                m = self.store.head_mean(name, bins)[row, head]  # (N, L)
            h, w = self.layer_size(name)
            m = m[:, :n_tokens].T.reshape(n_tokens, h, w)  # (L, h, w)
            total += F.interpolate(m[None], size=self.image_size, mode="bilinear", align_corners=False)[0]
        return total / len(names)

    def word_maps(self, image: int, layer: str | None = None, bins: list[int] | None = None,
                  head: int | None = None, negative: bool = False, include_special: bool = False,
                  normalize: str | None = "minmax") -> dict[str, torch.Tensor]:
        """{word: (H, W) map}; sub-tokens of a word are summed. include_special adds <start>/<end>,
        which soak up most attention in CLIP-conditioned models (hidden by default). normalize=None keeps the
        attention probabilities as they are (to normalise two runs' maps together)."""
        row = self._row(image, negative)
        maps = self.token_maps(image, layer, bins, head, negative)  # (L, H, W)
        words, ids = self.encoding.words[row], self.encoding.word_ids[row]
        out: dict[str, torch.Tensor] = {}
        if include_special:
            out[START] = maps[0]
        for i, wid in enumerate(ids):
            if wid is not None:
                key = _unique_word_key(words, wid)
                out[key] = out.get(key, 0) + maps[i]
        if include_special and len(ids) > 1 and ids[-1] is None:
            out[END] = maps[len(ids) - 1]
        return out if normalize is None else normalize_maps(out, normalize)

    def self_attention(self, image: int, layer: str, pixel: tuple[int, int], bins: list[int] | None = None,
                       normalize: str = "minmax") -> torch.Tensor:
        """Where the position at image pixel (y, x) looked in self-attention layer `layer`: (H, W)."""
        if layer not in self.layers("self"):
            raise KeyError(f"no self-attention recorded at {layer!r}; recorded: {self.layers('self')}")
        self._row(image, False)
        H, W = self.image_size
        y, x = pixel
        if not (0 <= y < H and 0 <= x < W):
            raise ValueError(f"pixel {pixel} is outside the {H}×{W} image.")
        h, w = self.layer_size(layer)
        query = (y * h // H) * w + (x * w // W)  # the layer position covering that pixel
        m = self.store.mean(layer, bins)[image, query].reshape(1, 1, h, w)
        m = F.interpolate(m, size=self.image_size, mode="bilinear", align_corners=False)[0, 0]
        return normalize_maps({"self": m}, normalize)["self"]

    def word_summary(self, image: int) -> dict[str, dict]:
        """Where each prompt word looked, as numbers (for readers without eyes: scripts, agents).

        {word: {"share", "peak", "centre", "region"}}: share is the word's part of the attention its prompt's
        words got, averaged over pixels (the shares sum to 1); peak the pixel (row, column) it looked at
        most; centre the mean pixel weighted by the map above its minimum (the floor every pixel gets would
        pull every centre to the middle); region the cell of a 3 × 3 grid the centre is in ("top left", …,
        "centre", …, "bottom right").
        """
        shares = self.word_maps(image, normalize="tokens")  # per pixel, the words' shares
        H, W = self.image_size
        rows, cols = torch.arange(H, dtype=torch.float32)[:, None], torch.arange(W, dtype=torch.float32)[None, :]
        out = {}
        for word, heat in self.word_maps(image, normalize="absolute").items():
            above = heat - heat.min()
            weight = above / above.sum().clamp_min(1e-12)
            cy, cx = (weight * rows).sum().item(), (weight * cols).sum().item()
            peak = divmod(int(heat.argmax()), W)
            out[word] = {"share": round(shares[word].mean().item(), 3), "peak": list(peak),
                         "centre": [round(cy, 1), round(cx, 1)], "region": _region(cy / H, cx / W)}
        return out

    # -- export -------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "prompts": self.prompts, "negative_prompts": self.negative_prompts, "seed": self.seed,
            "sampler": self.sampler, "steps": self.store.num_steps, "image_size": list(self.image_size),
            "bins": [[r.start, r.stop - 1] for r in self.bins],
            "self_attention_steps": [self.store.self_attention_steps(b) for b in range(self.store.num_bins)],
            "layers": [{"name": i.name, "kind": i.kind, "size": list(i.size), "heads": i.heads}
                       for i in self.store.layers.values()],
            "tokens": [self.tokens(i) for i in range(self.num_images)],
            "words": [self.words(i) for i in range(self.num_images)],
            "negative_tokens": [self.tokens(i, negative=True) for i in range(self.num_images)],
        }

    def export(self, directory: str | Path, images: list[Image.Image] | None = None, size: int = 256,
               self_attention: bool = False) -> list[Path]:
        """Write maps.json (metadata), maps.npz (per-layer, per-bin cross-attention and per-word maps of every
        image, float16) and, if `images` are given, one overlay PNG per image and word. Returns the paths.

        self_attention adds each self-attention layer's (bins, N, N) maps, quadratic in N: they were 95% of an
        export's bytes (the shipped model, 4 images: 0.9 MB zipped without them, 10.3 MB with), so only when
        asked. float16 keeps attention probabilities to 3 significant digits, enough to draw and compare them,
        at half of float32's size."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = self.layers("cross") + (self.layers("self") if self_attention else [])
        arrays, words = {}, []
        for i in range(self.num_images):
            for name in names:
                row = self._row(i, False) if self.store.layers[name].kind == "cross" else i
                arrays[f"image{i}.{name}"] = np.stack(
                    [self.store.mean(name, [b])[row].numpy() for b in self.store.recorded_bins(name)]
                ).astype(np.float16)  # (bins, N, L) or (bins, N, N)
            words.append(self.word_maps(i, normalize="absolute"))
            arrays[f"image{i}.words"] = np.stack([m.numpy() for m in words[i].values()]).astype(np.float16)  # (K, H, W)
        paths = [directory / "maps.json", directory / "maps.npz"]
        paths[0].write_text(json.dumps({**self.metadata(), "exported_layers": names}, indent=2))
        np.savez_compressed(paths[1], **arrays)
        for i, image in enumerate(images or []):
            image.resize(display_size(image.size, size), Image.NEAREST).save(directory / f"image{i}.png")
            paths.append(directory / f"image{i}.png")
            # min-max is scale-invariant: the absolute maps give the per-word display maps without
            # aggregating every layer again.
            for j, (word, heat) in enumerate(normalize_maps(words[i], "minmax").items()):
                path = directory / f"image{i}_{_safe(word)}.png"
                if path.exists():  # two long words alike in their first 64 characters
                    path = path.with_stem(f"{path.stem}_{j}")
                overlay(image, heat, size=size).save(path)
                paths.append(path)
        return paths


def _region(y: float, x: float) -> str:
    """The cell of a 3 × 3 grid a point at fractions (y, x) of the image lies in: "top left", "centre", …"""
    row = ("top", "", "bottom")[min(2, int(y * 3))]
    col = ("left", "", "right")[min(2, int(x * 3))]
    return f"{row} {col}".strip() or "centre"


def _unique_word_key(words: list[str], wid: int) -> str:
    """A word's label; a word that occurs twice gets its position ("circle", "circle #2")."""
    earlier = words[:wid].count(words[wid])
    return words[wid] if earlier == 0 else f"{words[wid]} #{earlier + 1}"


def display_size(image_size: tuple[int, int], longer_side: int) -> tuple[int, int]:
    """PIL (width, height) scaled so the longer side is `longer_side` (small samples are blown up)."""
    w, h = image_size
    scale = longer_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _safe(word: str, max_chars: int = 64) -> str:
    """A word as part of a file name: letters and digits kept, at most max_chars of them (a 300-letter word
    would pass the file system's 255-byte limit on names)."""
    return "".join(ch if ch.isalnum() else "_" for ch in word[:max_chars])


def normalize_maps(maps: dict[str, torch.Tensor], mode: str = "minmax") -> dict[str, torch.Tensor]:
    """Scale maps to [0, 1] for display.

    minmax: each map on its own (shape only); absolute: divided by the largest value of all maps
    (compares words); tokens: per pixel, each map's share of the shown maps (which word owns a pixel).
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {mode!r}; choose one of {NORMALIZATIONS}.")
    if not maps:
        return {}
    stack = torch.stack(list(maps.values())).float()  # (K, H, W)
    if mode == "minmax":
        lo = stack.amin(dim=(1, 2), keepdim=True)
        hi = stack.amax(dim=(1, 2), keepdim=True)
        stack = (stack - lo) / (hi - lo).clamp_min(1e-12)
    elif mode == "absolute":
        stack = stack / stack.max().clamp_min(1e-12)
    else:
        stack = stack / stack.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return dict(zip(maps, stack, strict=True))


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.6, size: int = 256) -> Image.Image:
    """Blend a [0, 1] heat map over an image with the inferno colormap; the longer side becomes `size`."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    W, H = display_size(image.size, size)
    base = image.convert("RGB").resize((W, H), Image.NEAREST)
    h = F.interpolate(heat.float()[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    idx = (h.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    colored = Image.fromarray(COLORMAP[idx].astype(np.uint8))
    return Image.blend(base, colored, alpha)
