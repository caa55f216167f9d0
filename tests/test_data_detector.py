"""Detector: near-perfect on ground-truth images (the precondition for trusting evaluation scores)."""

import numpy as np
import pytest
from PIL import Image

from data.detector import detect, relations, validate
from data.shapes import ShapesConfig, make_example, object_mask, relations_between, sample_scene


@pytest.mark.parametrize("size", [32, 64])
def test_accuracy_on_a_test_sample(size):
    scores = validate(n=40, size=size, split="test")
    for attribute in ("kind", "colour", "count", "relation", "size", "position"):
        assert scores[attribute] >= 0.99, (attribute, scores)
    assert scores["mask_iou"] >= 0.95


def test_detections_carry_kind_colour_centre_box_mask():
    img, row = make_example(ShapesConfig(size=64), "validation", 7)
    dets = detect(img)
    assert len(dets) == len(row["objects"])
    for o in row["objects"]:
        d = min(dets, key=lambda d: np.hypot(d.center[0] - o["center"][0], d.center[1] - o["center"][1]))
        assert (d.kind, d.colour, d.size) == (o["kind"], o["colour"], o["size"])
        assert np.allclose(d.center, o["center"], atol=0.5) and np.allclose(d.box, o["box"], atol=1.0)
        truth = object_mask(o, 64)
        assert d.mask.shape == (64, 64) and (d.mask & truth).sum() / (d.mask | truth).sum() > 0.9


def test_blank_and_noisy_images():
    assert detect(Image.new("RGB", (32, 32), (255, 255, 255))) == []
    rng = np.random.default_rng(0)
    img, row = make_example(ShapesConfig(size=32), "validation", 3)
    noisy = np.clip(np.asarray(img, dtype=float) + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
    got = sorted((d.kind, d.colour) for d in detect(noisy))
    assert got == sorted((o["kind"], o["colour"]) for o in row["objects"])


def test_relations_need_a_clear_offset():
    assert relations((5, 5), (25, 5), 32) == {"left of"}
    assert relations((25, 25), (5, 5), 32) == {"below", "right of"}
    assert relations((10, 10), (13, 12), 32) == set()


def test_centre_relations_agree_with_grid_cells():
    """The detector's centre rule reads the generator's cell relations back exactly (both sizes)."""
    for size in (32, 64):
        config = ShapesConfig(size=size)
        for i in range(200):
            objs = sample_scene(config, "test", i).objects
            for a in objs:
                for b in objs:
                    if a is not b:
                        assert relations(a.center, b.center, size) == set(relations_between(a, b))


def test_rejects_non_rgb_arrays():
    with pytest.raises(ValueError, match=r"expected an RGB image \(H, W, 3\)"):
        detect(np.zeros((8, 8), dtype=np.uint8))
