"""Captioned image datasets for training: any local image folder or hub dataset id, via `datasets`.

A local folder is Hugging Face `imagefolder` layout: images plus a `metadata.jsonl` / `.csv` /
`.parquet` whose `file_name` column names each image and another column holds its caption (a string,
or a list of strings of which one is picked per sample). The procedural shapes set (`data.shapes`)
is written in this layout, so training loads it like anyone's own data:

    ds = load_captioned("cache/shapes32", LoadConfig(resolution=32, caption_column="captions"))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)))
    batch["pixel_values"]  # (B, 3, 32, 32) float in [-1, 1];  batch["caption"]: list of B str

Transforms are PIL + torch (no torchvision): resize the shorter side, center or random crop, optional
horizontal flip that swaps "left" and "right" in the caption so it stays true, then [-1, 1].
Bad input (no metadata, no caption column, unreadable or truncated images, empty captions) raises an
error naming the file or column and the fix; `skip_bad=True` skips such samples and counts them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from data.shapes import object_mask, object_words, place_words

log = logging.getLogger(__name__)

METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


@dataclass(frozen=True)
class LoadConfig:
    """How to read and transform a captioned image set."""

    resolution: int = 32          # output side in pixels (square)
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"  # e.g. "captions" for the shapes set's list of phrasings
    crop: str = "center"          # "center" or "random"
    hflip: bool = False           # off by default: flips change what "left"/"right" mean
    skip_bad: bool = False        # skip (and count) bad samples instead of raising
    verify_images: bool = True    # decode every image once up front, so bad files fail early
    object_masks: bool = False    # also return each object's mask and words (needs the shapes set's `objects`)
    pick_caption: bool = True     # False: "captions", every phrasing of the row, for a trainer that picks one
                                  # with its own seeded generator (a prefetching loader runs items ahead of the step)

    def __post_init__(self):
        if self.resolution < 1:
            raise ValueError(f"resolution={self.resolution}: must be a positive number of pixels")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop={self.crop!r}: choose 'center' or 'random'")


# ----------------------------------------------------------------------------- transforms

def swap_left_right(caption: str) -> str:
    """'a red circle left of a blue square' -> '... right of ...' (also 'leftmost', 'top right')."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(1)], caption)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio; no-op when it already is."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def crop_box(image_size: tuple[int, int], size: int, random: bool,
             generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a size x size square: centred, or at a uniformly random offset."""
    w, h = image_size
    if random:
        left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return (left, top, left + size, top + size)


def crop_square(img: Image.Image, size: int, random: bool, generator: torch.Generator | None = None):
    """Crop a size x size square: centred, or at a uniformly random offset."""
    return img.crop(crop_box(img.size, size, random, generator))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image (W, H) -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)           # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


# ----------------------------------------------------------------------------- loading

def _check_local_folder(folder: Path) -> None:
    """Fail early, with the fix, on the folder mistakes `datasets` reports obscurely or not at all."""
    found = [p for name in METADATA_NAMES for p in folder.rglob(name)]
    if not found:
        raise FileNotFoundError(
            f"no metadata file in {folder}: add metadata.jsonl (one line per image, e.g. "
            '{"file_name": "0001.png", "text": "a red circle"}) or metadata.csv with columns '
            "file_name,text next to the images")
    for meta in found:
        if meta.suffix == ".parquet":
            continue  # binary: `datasets` reports its columns itself
        columns = _metadata_columns(meta)
        if "file_name" not in columns:
            raise ValueError(
                f"{meta} has no 'file_name' column (found {columns}): rename the column that holds "
                "the image file names to 'file_name' (imagefolder matches images by that exact key)")


def _metadata_columns(meta: Path) -> list[str]:
    with meta.open(newline="") as f:
        if meta.suffix == ".csv":
            return next(csv.reader(f), [])
        first = f.readline().strip()
    try:
        row = json.loads(first) if first else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta} line 1 is not valid JSON ({e}): write one JSON object per line") from e
    if not isinstance(row, dict):
        raise ValueError(f"{meta} line 1 is not a JSON object: write one {{...}} object per line")
    return list(row)


def _load_hf(source: str | Path, split: str) -> datasets.Dataset:
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file: pass the folder that holds the images and metadata")
        splits = _plain_layout(path)
        load = _load_folder if splits is None else _load_plain_split
        try:
            return load(path, split, splits)
        except (ValueError, TypeError, datasets.exceptions.DatasetGenerationError) as e:
            if isinstance(e, SplitNotFound):
                raise
            cause = f"; {e.__cause__}" if e.__cause__ else ""  # DatasetGenerationError hides the reason there
            raise ValueError(
                f"`datasets` could not read the folder {path} ({type(e).__name__}: {e}{cause}). Check the "
                "metadata file: one JSON object per line (or a CSV with a header row), every row with the "
                "same columns") from e
    if isinstance(source, str) and _HUB_ID.match(source) and not source.startswith("."):
        try:
            dsd = datasets.load_dataset(source)
        except Exception as e:  # the hub raises many types; all mean "could not get it"
            raise ValueError(f"could not load hub dataset {source!r} ({type(e).__name__}: {e}). "
                             "If you are offline (HF_HUB_OFFLINE=1), download it once online or pass "
                             "a local folder instead.") from e
        return _pick_split(dsd, split, source)
    raise FileNotFoundError(f"{source}: no such folder, and not a hub dataset id like 'owner/name'")


class SplitNotFound(ValueError):
    """The source has no split of that name (the message lists the ones it has)."""


def _pick_split(splits, split: str, source):
    if split not in splits:
        raise SplitNotFound(f"split {split!r} not found in {source}; available splits: {list(splits)}. "
                             "Pass LoadConfig(split=...)")
    return splits[split]


def _plain_layout(folder: Path) -> dict[str, Path] | None:
    """Split -> metadata file when the folder has one of the two plain layouts, else None.

    Plain: one metadata file at the top (a single "train" split), or one in each direct subfolder
    (`<split>/metadata.jsonl`, as `data.shapes` writes). Anything else goes to the imagefolder builder.
    """
    metas = [p for name in METADATA_NAMES for p in folder.rglob(name)]
    if len(metas) == 1 and metas[0].parent == folder:
        return {"train": metas[0]}
    per_split = {p.parent.name: p for p in metas if p.parent.parent == folder}
    if not per_split or len(per_split) != len(metas):
        return None
    if len(per_split) == 1 and next(iter(per_split)) not in ("validation", "test", "heldout"):
        return {"train": next(iter(per_split.values()))}  # e.g. <folder>/images/metadata.csv, as imagefolder
    order = {"train": 0, "validation": 1, "test": 2}
    return dict(sorted(per_split.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])))


def _load_plain_split(folder: Path, split: str, splits: dict[str, Path]) -> datasets.Dataset:
    """Read one split's metadata with `datasets` and add the image column itself.

    Same result as the imagefolder builder (an `image` column, `file_name` dropped), but imagefolder
    resolves every image path through slow pattern matching: ~18 s for 50,000 files here, this ~1 s.
    """
    meta = _pick_split(splits, split, folder)
    read = {".jsonl": datasets.Dataset.from_json, ".csv": datasets.Dataset.from_csv,
            ".parquet": datasets.Dataset.from_parquet}[meta.suffix]
    ds = read(str(meta), cache_dir=str(_cache_dir([meta])))  # the cache holds only the metadata table
    if "file_name" not in ds.column_names:  # parquet is not pre-checked by _check_local_folder
        raise ValueError(f"{meta} has no 'file_name' column (found {ds.column_names}): rename the column "
                         "that holds the image file names to 'file_name'")
    base = meta.parent.resolve()  # imagefolder semantics: file_name is relative to the metadata file
    paths = [str(base / name) for name in ds["file_name"]]
    ds = ds.remove_columns("file_name").add_column("image", paths)
    ds = ds.select_columns(["image", *(c for c in ds.column_names if c != "image")])  # imagefolder's order
    return ds.cast_column("image", datasets.Image(decode=False))


def _load_folder(folder: Path, split: str, splits: None) -> datasets.Dataset:
    # a resolved path: `load_dataset(".")` fails in datasets 5.2
    dsd = datasets.load_dataset(str(folder.resolve()), cache_dir=str(_cache_dir(folder)))
    return _pick_split(dsd, split, folder)


def _cache_dir(files: Path | list[Path]) -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "local-folders" / _fingerprint(files)


def _fingerprint(files: Path | list[Path]) -> str:
    """Hash of the resolved path, size and mtime of each file (every file under it, for a folder).

    `datasets` 5.2 keys its cache of a local folder on less than this: after regenerating a folder in
    place it served the old captions, and after moving one it served paths that no longer exist.
    A cache directory per fingerprint makes every change of the folder a fresh (cheap) preparation.
    """
    files = sorted(p for p in files.rglob("*") if p.is_file()) if isinstance(files, Path) else files
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _describe(image_value, index: int) -> str:
    path = image_value.get("path") if isinstance(image_value, dict) else image_value
    return f"{path or '<embedded image>'} (row {index})"


def _open_image(image_value) -> Image.Image:
    """Decode one undecoded `datasets` Image value ({'path', 'bytes'}) or a path string fully."""
    if isinstance(image_value, dict):
        data = image_value.get("bytes")
        img = Image.open(io.BytesIO(data)) if data else Image.open(image_value["path"])
    else:
        img = Image.open(image_value)
    img.load()  # PIL decodes lazily: force it so a truncated file fails here, not mid-training
    return img


def _caption_problem(caption) -> str | None:
    if caption is None:  # an empty CSV cell or a JSON null
        return "empty caption"
    if isinstance(caption, str):
        return None if caption.strip() else "empty caption"
    if isinstance(caption, list | tuple):
        if not caption or not all(isinstance(c, str) and c.strip() for c in caption):
            return "empty caption list or an empty caption in the list"
        return None
    return f"caption is {type(caption).__name__}, not a string or a list of strings"


class CaptionedImages(torch.utils.data.Dataset):
    """Torch dataset over a `datasets.Dataset` of images and captions.

    Item: {"pixel_values": float (3, R, R) in [-1, 1], "caption": str, "index": int (row in `hf`)} ("captions",
    the row's list of phrasings, instead of "caption" with config.pick_caption off); with
    config.object_masks also "object_masks": float (K, R, R) in [0, 1], the K objects' masks under the same
    resize, crop and flip as the image, and "object_words": per object, the words that name it
    (data.shapes.object_words), for the grounding loss.
    `skipped` lists the bad rows left out when config.skip_bad is set.
    """

    def __init__(self, hf: datasets.Dataset, config: LoadConfig = LoadConfig(), source: str = "dataset"):
        self.config = config
        for col, option in ((config.image_column, "image_column"), (config.caption_column, "caption_column")):
            if col not in hf.column_names:
                raise ValueError(f"{source} has no column {col!r} (columns: {hf.column_names}): pass "
                                 f"LoadConfig({option}=...) naming the right one, or rename it in the "
                                 "metadata file")
        if config.object_masks and "objects" not in hf.column_names:
            raise ValueError(f"{source} has no 'objects' column, which object_masks needs (per image, a list of "
                             "objects with kind, colour, size and box, as data.shapes writes): turn the "
                             "grounding loss off, or train on the shapes set")
        if isinstance(hf.features[config.image_column], datasets.Image):
            # decode ourselves, so a bad file is reported by name (or skipped) instead of crashing a worker
            hf = hf.cast_column(config.image_column, datasets.Image(decode=False))
        self.hf = hf
        self.skipped: list[str] = []
        self.rows = self._check_rows()
        if self.skipped:
            log.warning("skipped %d bad samples of %d in %s, e.g. %s", len(self.skipped), len(hf), source,
                        self.skipped[0])

    def _check_rows(self) -> list[int]:
        cfg = self.config
        images = self.hf[cfg.image_column]
        captions = self.hf[cfg.caption_column]
        good = []
        for i, (image_value, caption) in enumerate(zip(images, captions, strict=True)):
            problem = _caption_problem(caption)
            if problem:
                problem += f" in column {cfg.caption_column!r}: write a caption for it or remove the row"
            elif cfg.verify_images:
                try:
                    _open_image(image_value)
                except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
                    problem = (f"unreadable or truncated image ({type(e).__name__}: {e}): re-export or "
                               "delete the file and its metadata row")
            if problem is None:
                good.append(i)
            elif cfg.skip_bad:
                self.skipped.append(f"{_describe(image_value, i)}: {problem}")
            else:
                raise ValueError(f"{_describe(image_value, i)}: {problem}; or pass LoadConfig(skip_bad=True) "
                                 "to skip bad samples")
        return good

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        cfg = self.config
        row = self.hf[self.rows[i]]
        try:
            img = _open_image(row[cfg.image_column]).convert("RGB")
        except Exception as e:
            raise ValueError(f"{_describe(row[cfg.image_column], self.rows[i])}: unreadable image "
                             f"({type(e).__name__}: {e})") from e
        caption = row[cfg.caption_column]
        captions = [caption] if isinstance(caption, str) else list(caption)
        if cfg.pick_caption:
            # torch RNG: DataLoader seeds it per worker, so workers do not repeat each other's picks
            captions = [captions[int(torch.randint(len(captions), (1,)))]]
        source_size = img.size
        img = resize_shorter(img, cfg.resolution)
        box = crop_box(img.size, cfg.resolution, cfg.crop == "random")
        img = img.crop(box)
        flip = cfg.hflip and bool(torch.rand(()) < 0.5)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            captions = [swap_left_right(c) for c in captions]
        item = {"pixel_values": to_tensor(img), "index": self.rows[i]}
        if cfg.pick_caption:
            item["caption"] = captions[0]
        else:
            item["captions"] = captions
        if cfg.object_masks:
            item["object_masks"], item["object_words"], item["object_places"] = self._object_masks(
                row["objects"], source_size, box, flip)
        return item

    def _object_masks(self, objects: list[dict], source_size: tuple[int, int], box, flip: bool):
        """Each object's mask, drawn at the source size and transformed like the image: (K, R, R) in [0, 1];
        the words naming it (data.shapes.object_words) and its place (data.shapes.place_words, mirrored
        with the image, as the caption's left and right are)."""
        if source_size[0] != source_size[1]:
            raise ValueError(f"object masks need square source images (the shapes set's), got {source_size}")
        R = self.config.resolution
        masks = []
        for obj in objects:
            m = Image.fromarray(object_mask(obj, source_size[0]).astype(np.uint8) * 255)
            m = resize_shorter(m, R).crop(box)
            if flip:
                m = m.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            masks.append(torch.from_numpy(np.asarray(m, dtype=np.float32) / 255))
        masks = torch.stack(masks) if masks else torch.zeros(0, R, R)
        places = [place_words(obj["row"], 2 - obj["col"] if flip else obj["col"]) for obj in objects]
        return masks, [object_words(obj) for obj in objects], places


def load_captioned(source: str | Path, config: LoadConfig = LoadConfig()) -> CaptionedImages:
    """A torch dataset from a local imagefolder-style folder or a hub dataset id.

    source: folder with images + metadata.jsonl/.csv/.parquet (optionally in split subfolders,
        e.g. the output of `data.shapes.generate_dataset`), or a hub id like "owner/name".
    """
    return CaptionedImages(load_table(source, config.split), config, source=str(source))


@dataclass
class ImageTextPairs:
    """N captioned pictures held in memory, for contrastive training (each batch scores all of its pairs).

    pixels: (N, 3, R, R) uint8.  texts: per picture, its caption (the `text` column, its first if a list).
    captions: per picture, every true phrasing known (`text` plus a `captions` column), for training (one is
        drawn per step) and for judging retrieval (a hit = the query describes the picture).
    """

    pixels: torch.Tensor
    texts: list[str]
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: slice) -> ImageTextPairs:
        return ImageTextPairs(self.pixels[index], self.texts[index], self.captions[index])


def load_pairs(source: str | Path, resolution: int, split: str = "train") -> ImageTextPairs:
    """Every row of a split in memory: the pictures under CaptionedImages' resize and centre crop, and their
    captions. A bad row raises the same error, naming the file or column and the fix, as load_captioned."""
    table = load_table(source, split)
    config = LoadConfig(resolution=resolution, split=split, caption_column="text", pick_caption=False,
                        verify_images=False)  # each picture is decoded once, below
    data = CaptionedImages(table, config, source=str(source))
    extra = table["captions"] if "captions" in table.column_names else [None] * len(table)
    pixels = torch.empty(len(data), 3, resolution, resolution, dtype=torch.uint8)
    texts, captions = [], []
    for i in range(len(data)):
        item = data[i]
        pixels[i] = item["pixel_values"].add(1).mul(127.5).round().to(torch.uint8)  # to_tensor, undone exactly
        texts.append(item["captions"][0])
        captions.append(list(dict.fromkeys(item["captions"] + list(extra[item["index"]] or []))))  # keep order
    return ImageTextPairs(pixels, texts, captions)


def load_table(source: str | Path, split: str = "train") -> datasets.Dataset:
    """The rows of a folder or hub dataset as `datasets` reads them (images undecoded where local), before any
    check of a row: for a caller that looks at the columns first (which holds the captions?), as the app's
    fine-tune tab does. Folder mistakes raise the same errors, naming the fix, as load_captioned."""
    path = Path(source)
    if path.is_dir():
        _check_local_folder(path)
    return _load_hf(source, split)
