"""A classical detector for the shapes set: kind, colour, size, centre, box and mask of each object.

Used by evaluation to score generated images, so it is validated against ground truth first:

    python -m data.detector --validate --n 500      # per-attribute accuracy on the test split, 32 and 64 px

How it works (no learning, so nothing can be fitted to the test split):
1. Background = per-channel median of the border pixels (backgrounds are plain).
2. Every pixel p is explained as a blend of background and one palette colour c:
   p ~ bg + a (c - bg). The colour with the smallest residual gives a per-pixel coverage a.
3. Objects = 4-connected components of {a >= 0.5}, the same rule that defines ground-truth masks.
   The generator keeps >= 1 px between objects, so components never merge.
4. Colour = majority palette colour of the component's most covered pixels.
5. Kind = the shape hypothesis whose rendered coverage best matches the observed soft coverage:
   for each kind, its side follows from the (antialiased, hence sub-pixel exact) area and its box
   from the coverage centroid; the one with the smallest L1 error wins.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.shapes import COLOURS, KINDS, SIZES, ShapesConfig, coverage, make_example, object_mask

# Fraction of its bounding square each shape covers, and its centroid's depth below the box top
# (as a fraction of the side): the triangle's centroid sits 2/3 of the way down.
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}
CENTROID_DEPTH = {"circle": 0.5, "square": 0.5, "triangle": 2 / 3, "diamond": 0.5, "cross": 0.5}
PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in PALETTE_NAMES], dtype=np.float32)  # (K, 3)
# Midway between the size classes (fractions of the image side).
SIZE_SPLIT = (SIZES["small"][1] + SIZES["large"][0]) / 2


@dataclass
class Detection:
    """One detected object. Coordinates are pixels; box is (x0, y0, x1, y1), mask is bool (H, W)."""

    kind: str
    colour: str
    size: str
    center: tuple[float, float]
    box: tuple[float, float, float, float]
    mask: np.ndarray
    area: float      # soft (antialiased) area in pixels
    fit_error: float  # L1 mismatch of the best shape hypothesis per unit area: ~0 for a clean shape


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a bool (H, W) mask: 0 for background, 1..n for components."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:  # propagate the minimum label to 4-neighbours until stable (~object diameter rounds)
        nxt = labels.copy()
        nxt[1:] = np.minimum(nxt[1:], labels[:-1])
        nxt[:-1] = np.minimum(nxt[:-1], labels[1:])
        nxt[:, 1:] = np.minimum(nxt[:, 1:], labels[:, :-1])
        nxt[:, :-1] = np.minimum(nxt[:, :-1], labels[:, 1:])
        nxt[~mask] = big
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    _, dense = np.unique(np.where(mask, labels, 0), return_inverse=True)
    return dense.reshape(h, w)


def _grow(labels: np.ndarray, steps: int) -> np.ndarray:
    """Dilate labelled components into unlabelled pixels, `steps` 4-neighbour rounds."""
    out = labels.copy()
    everything = slice(None)
    # (pixels, their neighbour) slice pairs: neighbour below, above, right, left
    pairs = (((slice(None, -1), everything), (slice(1, None), everything)),
             ((slice(1, None), everything), (slice(None, -1), everything)),
             ((everything, slice(None, -1)), (everything, slice(1, None))),
             ((everything, slice(1, None)), (everything, slice(None, -1))))
    for _ in range(steps):
        nxt = out.copy()
        for pixels, neighbours in pairs:
            dst, src = nxt[pixels], out[neighbours]  # dst is a view: writing it fills nxt
            fill = (dst == 0) & (src > 0)
            dst[fill] = src[fill]
        out = nxt
    return out


def _blend_fit(pixels: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the palette colour that best explains it as a bg/colour blend, and its coverage.

    pixels: float32 (H, W, 3). Returns colour index int (H, W) and coverage float32 (H, W) in [0, 1].
    """
    diff = pixels - bg                                          # (H, W, 3)
    v = PALETTE - bg                                            # (K, 3)
    alpha = np.clip(diff @ v.T / (v * v).sum(1), 0, 1)          # (H, W, K)
    resid = np.linalg.norm(diff[..., None, :] - alpha[..., None] * v, axis=-1)  # (H, W, K)
    best = resid.argmin(-1)                                     # (H, W)
    return best, np.take_along_axis(alpha, best[..., None], -1)[..., 0]


def _fit_kind(soft: np.ndarray, y_off: int, x_off: int) -> tuple[str, float, float, tuple]:
    """Best shape hypothesis for one object's soft coverage patch (h, w) at (y_off, x_off).

    Returns (kind, L1 error per unit area, side in pixels, box (x0, y0, x1, y1)).
    """
    area = float(soft.sum())
    ys, xs = np.mgrid[:soft.shape[0], :soft.shape[1]]
    cy = float((soft * (ys + 0.5)).sum()) / area + y_off
    cx = float((soft * (xs + 0.5)).sum()) / area + x_off
    best = None
    for kind in KINDS:
        d = math.sqrt(area / FILL[kind])
        y0 = cy - CENTROID_DEPTH[kind] * d
        box = (cx - d / 2, y0, cx + d / 2, y0 + d)
        window = (x_off, y_off, x_off + soft.shape[1], y_off + soft.shape[0])
        err = float(np.abs(coverage(kind, box, window) - soft).sum()) / area
        if best is None or err < best[1]:
            best = (kind, err, d, box)
    return best


def detect(image: Image.Image | np.ndarray, min_area: float | None = None) -> list[Detection]:
    """Find the objects in one image (RGB PIL image or uint8 (H, W, 3) array), sorted top to bottom.

    min_area: components with less soft area (pixels) are noise, not objects; default 4 px at 32 px,
        scaled with the image area (the smallest real object covers ~18 px at 32 px).
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got an array of shape {pixels.shape}")
    h, w, _ = pixels.shape
    min_area = 4.0 * h * w / 32**2 if min_area is None else min_area
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2H+2W, 3)
    bg = np.median(border, axis=0)
    colour_idx, alpha = _blend_fit(pixels, bg)
    labels = _label(alpha >= 0.5)
    # every pixel belongs to its nearest component (within 2 px), so edge pixels of one object are
    # not counted in its neighbour's soft area
    owner = _grow(labels, steps=2)
    detections = []
    for k in range(1, labels.max() + 1):
        comp = labels == k
        core = comp & (alpha >= np.quantile(alpha[comp], 0.5))
        colour = int(np.bincount(colour_idx[core], minlength=len(PALETTE)).argmax())
        # soft coverage of this colour, restricted to the pixels this component owns
        v = PALETTE[colour] - bg
        soft_all = np.clip((pixels - bg) @ v / (v @ v), 0, 1) * (owner == k)
        ys, xs = np.nonzero(owner == k)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        soft = soft_all[y0:y1, x0:x1]
        if soft.sum() < min_area:
            continue
        kind, err, side, box = _fit_kind(soft, y0, x0)
        detections.append(Detection(
            kind=kind, colour=PALETTE_NAMES[colour], size="small" if side / w < SIZE_SPLIT else "large",
            center=((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), box=box, mask=comp,
            area=float(soft.sum()), fit_error=err))
    return sorted(detections, key=lambda d: (d.center[1], d.center[0]))


def cell(center: tuple[float, float], image_size: int) -> tuple[int, int]:
    """The (row, col) of the 3×3 grid cell that a centre (x, y) in pixels lies in."""
    x, y = center
    return min(2, int(y * 3 // image_size)), min(2, int(x * 3 // image_size))


def relations(a_center: tuple[float, float], b_center: tuple[float, float], image_size: int) -> set[str]:
    """Relations from a to b, from centres: a clear half-cell (1/6 of the side) offset is required."""
    dx, dy = b_center[0] - a_center[0], b_center[1] - a_center[1]
    t = image_size / 6
    rels = set()
    if dy > t:
        rels.add("above")
    if dy < -t:
        rels.add("below")
    if dx > t:
        rels.add("left of")
    if dx < -t:
        rels.add("right of")
    return rels


# ----------------------------------------------------------------------------- validation

def _match(gt: list[dict], dets: list[Detection]) -> list[Detection | None]:
    """For each ground-truth object, the detection whose centre lies inside its box (or None)."""
    out = []
    for o in gt:
        x0, y0, x1, y1 = o["box"]
        inside = [d for d in dets if x0 <= d.center[0] <= x1 and y0 <= d.center[1] <= y1]
        out.append(inside[0] if len(inside) == 1 else None)
    return out


def validate(n: int = 500, size: int = 32, split: str = "test", seed: int = 0) -> dict[str, float]:
    """Per-attribute accuracy of `detect` on the first n images of a split, rendered at `size` px.

    kind / colour / size / position / mask IoU are per ground-truth object, count per image,
    relation per unordered object pair (the detected relation set must equal the true one).
    """
    config = ShapesConfig(size=size, seed=seed)
    hits = {"kind": [], "colour": [], "size": [], "position": [], "count": [], "relation": [], "mask_iou": []}
    for i in range(n):
        img, row = make_example(config, split, i)
        gt = row["objects"]
        dets = detect(img)
        matched = _match(gt, dets)
        hits["count"].append(len(dets) == len(gt))
        for o, d in zip(gt, matched, strict=True):
            hits["kind"].append(d is not None and d.kind == o["kind"])
            hits["colour"].append(d is not None and d.colour == o["colour"])
            hits["size"].append(d is not None and d.size == o["size"])
            hits["position"].append(d is not None and cell(d.center, size) == (o["row"], o["col"]))
            true_mask = object_mask(o, size)
            iou = 0.0 if d is None else (d.mask & true_mask).sum() / (d.mask | true_mask).sum()
            hits["mask_iou"].append(iou)
        for a in range(len(gt)):
            for b in range(a + 1, len(gt)):
                truth = relations(gt[a]["center"], gt[b]["center"], size)
                da, db = matched[a], matched[b]
                hits["relation"].append(da is not None and db is not None
                                        and relations(da.center, db.center, size) == truth)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Validate the shapes detector against ground truth.")
    p.add_argument("--validate", action="store_true", help="print per-attribute accuracy")
    p.add_argument("--n", type=int, default=500, help="images per resolution")
    p.add_argument("--split", default="test", help="split to validate on (develop on 'validation')")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.validate:
        p.error("nothing to do: pass --validate")
    results = {}
    for size in args.sizes:
        t0 = time.perf_counter()
        results[size] = validate(args.n, size, args.split, args.seed)
        print(f"{size} px: {args.n} images in {time.perf_counter() - t0:.1f} s")
    print(f"\nDetector accuracy, split={args.split} seed={args.seed} n={args.n} images per size\n")
    print("| attribute | " + " | ".join(f"{s} px" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for attr in next(iter(results.values())):
        fmt = "{:.3f}" if attr == "mask_iou" else "{:.2%}"  # IoU is a mean, the rest are accuracies
        cells = " | ".join(fmt.format(results[s][attr]) for s in args.sizes)
        print(f"| {attr} | {cells} |")


if __name__ == "__main__":
    main()
