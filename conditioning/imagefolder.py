"""Captioned images in Hugging Face `imagefolder` layout, read with PIL into memory, for CLIP training.

Layout: `<root>/<split>/metadata.jsonl`, one JSON object per line with `file_name` (relative to that
folder) and `text` (a string or a list of strings); an optional `captions` list holds more true
phrasings (the shapes set writes one). Other columns are ignored. A folder with `metadata.jsonl` at the
top level counts as a train split with no validation split.

Images are small (32-64 px), so a whole split is held as one uint8 tensor; the normalisation to CLIP's
mean/std happens per batch (`to_pixel_values`). No torchvision: PIL resizes, torch normalises.

Shapes: N images, S image size.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's normalisation constants (also written into preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev")}


@dataclass
class CaptionedImages:
    """N captioned images.

    Attributes:
        pixels: (N, 3, S, S) uint8.
        texts: per image, its caption (the `text` column; the first one if it is a list).
        captions: per image, every true phrasing known (`text` plus the `captions` column), for training
            (one is drawn per step) and for judging retrieval (a hit = the query describes the image).
    """

    pixels: torch.Tensor
    texts: list[str]
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: slice) -> "CaptionedImages":
        return CaptionedImages(self.pixels[index], self.texts[index], self.captions[index])


def find_split(root: str | Path, split: str) -> Path | None:
    """The folder holding `split`'s metadata.jsonl (accepting the usual aliases), or None."""
    root = Path(root)
    for name in SPLIT_NAMES.get(split, (split,)):
        if (root / name / "metadata.jsonl").is_file():
            return root / name
    if split == "train" and (root / "metadata.jsonl").is_file():
        return root
    return None


def load_split(folder: str | Path, image_size: int) -> CaptionedImages:
    """Read every row of `folder/metadata.jsonl`: images resized to `image_size` squares, captions."""
    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{folder / 'metadata.jsonl'} has no rows.")
    missing = [k for k in ("file_name", "text") if k not in rows[0]]
    if missing:
        raise ValueError(
            f"{folder / 'metadata.jsonl'} rows lack {missing} (have {sorted(rows[0])}); imagefolder "
            "captions need `file_name` and `text` columns."
        )
    pixels = torch.empty(len(rows), 3, image_size, image_size, dtype=torch.uint8)
    texts, captions = [], []
    for i, row in enumerate(rows):
        pixels[i] = _load_image(folder / row["file_name"], image_size)
        text = [row["text"]] if isinstance(row["text"], str) else list(row["text"])
        texts.append(text[0])
        captions.append(list(dict.fromkeys(text + list(row.get("captions") or []))))  # dedupe, keep order
    return CaptionedImages(pixels, texts, captions)


def _load_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) uint8: shorter side resized to `size` (bicubic), then centre-cropped, like CLIP."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            scale = size / min(im.size)
            w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
            im = im.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def zoom_out_on_white(pixels: torch.Tensor, generator: torch.Generator, min_scale: float = 0.75,
                      flip: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, S, S) uint8 pictures on white, each shrunk by a random factor in [min_scale, 1] and pasted at a
    random place on a white square, and mirrored where `flip` (B,) bool allows it (with probability 1/2).

    For clip art (one drawing on white): the whole drawing stays in view, so its caption stays true; a
    mirror is only allowed where no caption says "left" or "right". Draws come from `generator` only,
    so a run that seeds it per step reads the same pictures after a resume.
    """
    b, _, size, _ = pixels.shape
    scales = torch.empty(b).uniform_(min_scale, 1.0, generator=generator).tolist()
    corners = torch.rand(b, 2, generator=generator).tolist()
    mirror = torch.rand(b, generator=generator) < 0.5
    if flip is not None:
        mirror &= flip
    out = torch.full_like(pixels, 255)
    for i, (scale, (fy, fx)) in enumerate(zip(scales, corners, strict=True)):
        side = max(1, round(size * scale))
        small = torch.nn.functional.interpolate(pixels[i : i + 1].float(), size=(side, side), mode="bilinear",
                                                antialias=True, align_corners=False)  # (1, 3, side, side)
        top, left = round(fy * (size - side)), round(fx * (size - side))
        out[i, :, top : top + side, left : left + side] = small[0].round().clamp(0, 255).to(torch.uint8)
        if mirror[i]:
            out[i] = out[i].flip(-1)
    return out


def to_pixel_values(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float, normalised with CLIP's mean/std (what CLIPModel's vision tower expects)."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std
