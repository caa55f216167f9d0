"""Shapes generator: determinism, captions true to the ground truth, held-out combinations, masks."""

import hashlib
import json
import re

import numpy as np
import pytest

from data.shapes import (
    BACKGROUNDS,
    COLOURS,
    CONVERSE,
    KINDS,
    POSITION_WORDS,
    ShapeObject,
    ShapesConfig,
    generate_dataset,
    held_out_in,
    make_example,
    object_mask,
    relations_between,
    sample_scene,
)

COUNTS = {"train": 30, "validation": 6, "test": 6, "heldout": 6}
COLOUR_RE = "|".join(COLOURS)
KIND_RE = "|".join(KINDS)
MENTION = rf"\b(a|an|two|three) (?:(small|large) )?({COLOUR_RE}) ({KIND_RE})(?:es|s)?"
POSITION_RE = "|".join(POSITION_WORDS.values())
REL_WORDS = {"above": "above", "below": "below", "to the left of": "left of", "to the right of": "right of"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return generate_dataset(out / "a", ShapesConfig(seed=3), COUNTS, workers=2, progress=False)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_worker_count(generated, tmp_path):
    again = generate_dataset(tmp_path / "b", ShapesConfig(seed=3), COUNTS, workers=1, progress=False)
    first, second = _files(generated), _files(again)
    assert len(first) == sum(COUNTS.values()) + len(COUNTS) + 2  # pngs, metadata per split, card, info
    assert first == second
    other = generate_dataset(tmp_path / "c", ShapesConfig(seed=4), COUNTS, workers=1, progress=False)
    assert _files(other)["train/000000.png"] != first["train/000000.png"]


def test_layout_and_metadata_columns(generated):
    for split, n in COUNTS.items():
        rows = [json.loads(line) for line in (generated / split / "metadata.jsonl").read_text().splitlines()]
        assert len(rows) == n
        for row in rows:
            assert (generated / split / row["file_name"]).is_file()
            assert row["text"] in row["captions"] and row["background"] in BACKGROUNDS
            assert 1 <= len(row["objects"]) <= 3
    info = json.loads((generated / "shapes_info.json").read_text())
    assert "green triangle" in info["held_out_pairs"] and info["counts"] == COUNTS


def test_reuses_finished_output(generated):
    before = (generated / "train" / "000000.png").stat().st_mtime_ns
    generate_dataset(generated, ShapesConfig(seed=3), COUNTS, workers=1, progress=False)
    assert (generated / "train" / "000000.png").stat().st_mtime_ns == before


def test_refuses_to_mix_with_a_different_set_unless_overwrite(tmp_path):
    small = {"train": 5, "validation": 0, "test": 0, "heldout": 0}
    generate_dataset(tmp_path, ShapesConfig(seed=0), {**small, "train": 8}, workers=1, progress=False)
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        generate_dataset(tmp_path, ShapesConfig(seed=0), small, workers=1, progress=False)
    generate_dataset(tmp_path, ShapesConfig(seed=0), small, workers=1, progress=False, overwrite=True)
    assert len(list((tmp_path / "train").glob("*.png"))) == 5  # no stale images left from the bigger set


def _check_caption(caption: str, objects: list[dict]) -> None:
    """Every object mention, count, size, position and relation in the caption holds in `objects`."""
    text = re.sub(r"^(a picture of |an image of )", "", caption)
    text = re.sub(r" on a ({}) background$".format("|".join(BACKGROUNDS)), "", text)

    def matching(m):
        _, size, colour, kind = m.groups()
        return [o for o in objects if o["colour"] == colour and o["kind"] == kind
                and (size is None or o["size"] == size)]

    mentions = list(re.finditer(MENTION, text))
    assert mentions, caption
    for m in mentions:
        found = matching(m)
        number = {"a": 1, "an": 1, "two": 2, "three": 3}[m.group(1)]
        assert len(found) >= number, caption
        if number > 1:  # "two red circles" means exactly two red circles
            same = [o for o in objects if (o["colour"], o["kind"]) == (m.group(3), m.group(4))]
            assert len(same) == number, caption
        after = text[m.end():]
        pos = re.match(rf" ({POSITION_RE})\b", after)
        if pos:
            assert any(POSITION_WORDS[(o["row"], o["col"])] == pos.group(1) for o in found), caption
        rel = re.match(rf" (above|below|to the left of|to the right of) {MENTION}", after)
        if rel:
            other = matching(re.match(MENTION, after[len(rel.group(1)) + 2:]))
            assert len(found) == 1 and len(other) == 1, caption
            a, b = (ShapeObject(o["kind"], o["colour"], o["size"], o["row"], o["col"], tuple(o["box"]))
                    for o in (found[0], other[0]))
            assert REL_WORDS[rel.group(1)] in relations_between(a, b), caption


@pytest.mark.parametrize("size", [32, 64])
def test_captions_agree_with_ground_truth(size):
    config = ShapesConfig(size=size)
    n_counts = n_relations = 0
    for i in range(150):
        _, row = make_example(config, "test", i)
        for caption in row["captions"]:
            _check_caption(caption, row["objects"])
            n_counts += bool(re.search(r"\b(two|three) ", caption))
            n_relations += bool(re.search(r" (above|below|to the left of|to the right of) ", caption))
        # the grouped phrasing names every object exactly once
        first = row["captions"][0]
        numbers = [{"a": 1, "an": 1, "two": 2, "three": 3}[m.group(1)] for m in re.finditer(MENTION, first)]
        assert sum(numbers) == len(row["objects"]), first
    assert n_counts > 10 and n_relations > 30  # counting and relation phrasings really occur


def test_held_out_combinations_absent_from_train_and_present_in_heldout():
    config = ShapesConfig()
    pairs = [f"{c} {k}" for c, k in config.held_out_pairs]
    for i in range(400):
        scene = sample_scene(config, "train", i)
        assert held_out_in(scene, config) == []
        for o in scene.objects:
            assert (o.colour, o.kind) not in config.held_out_pairs
        for a in scene.objects:
            for b in scene.objects:
                if a is not b:
                    for rel in relations_between(a, b):
                        assert (a.kind, rel, b.kind) not in config.held_out_relations
        _, row = make_example(config, "train", i)
        assert not any(p in c for p in pairs for c in row["captions"]), row["captions"]
    found = [held_out_in(sample_scene(config, "heldout", i), config) for i in range(100)]
    assert all(found)
    kinds_found = {f for fs in found for f in fs}
    assert any(" above " in f or " left of " in f for f in kinds_found)  # relations too, not only pairs
    assert any(f in pairs for f in kinds_found)


def test_masks_rebuild_exactly_and_match_the_pixels():
    config = ShapesConfig(size=32)
    for i in range(30):
        img, row = make_example(config, "validation", i)
        pixels = np.asarray(img, dtype=float)
        bg = np.array(BACKGROUNDS[row["background"]], dtype=float)
        union = np.zeros((32, 32), dtype=bool)
        for o in json.loads(json.dumps(row["objects"])):  # through JSON, as a reader of metadata.jsonl
            mask = object_mask(o, 32)
            assert mask.sum() > 10 and not (mask & union).any()  # objects are disjoint
            union |= mask
            v = np.array(COLOURS[o["colour"]], dtype=float) - bg
            alpha = (pixels - bg) @ v / (v @ v)  # (H, W) how far each pixel is blended towards the colour
            # mask = at least half covered (up to uint8 rounding), and it is where the object's colour is
            assert (alpha[mask] >= 0.5 - 1 / np.sqrt(v @ v)).all()
            near = _dilate(mask) & ~mask
            assert (alpha[near] <= 0.5 + 1 / np.sqrt(v @ v)).all()
            x0, y0, x1, y1 = o["box"]
            ys, xs = np.nonzero(mask)
            assert x0 - 1 <= xs.min() and xs.max() <= x1 and y0 - 1 <= ys.min() and ys.max() <= y1
        assert (np.abs(pixels[~union] - bg).max(axis=1) < 255 * 0.5 + 1).all()


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def test_bad_config_and_split_raise_with_the_fix():
    with pytest.raises(ValueError, match="size >= 24"):
        ShapesConfig(size=16)
    with pytest.raises(ValueError, match="not a known colour"):
        ShapesConfig(held_out_pairs=(("pink", "circle"),))
    with pytest.raises(ValueError, match="unknown split"):
        sample_scene(ShapesConfig(), "training", 0)
    with pytest.raises(ValueError, match="unknown split"):
        generate_dataset("/tmp/never-written", ShapesConfig(), {"dev": 3}, progress=False)


def test_default_config_draws_what_it_always_drew():
    """New generator options default to the old behaviour: the digest was taken before they existed,
    so caches written then stay valid (and train.py --data shapes keeps its data)."""
    h = hashlib.sha256()
    for split in ("train", "test", "heldout"):
        for i in range(40):
            img, row = make_example(ShapesConfig(), split, i)
            h.update(img.tobytes())
            h.update(json.dumps(row, sort_keys=True).encode())
    assert h.hexdigest() == "94f31192f84e889db57309ff25a53d71f90bb5b15d384f6b7200383ccc55d7e8"


def test_a_cache_written_before_newer_config_fields_is_reused(generated):
    info_path = generated / "shapes_info.json"
    info = json.loads(info_path.read_text())
    before = (generated / "train" / "000000.png").stat().st_mtime_ns
    try:
        for field in ("object_count_weights", "relation_captions", "relation_pairs"):
            del info["config"][field]
        info_path.write_text(json.dumps(info))
        generate_dataset(generated, ShapesConfig(seed=3), COUNTS, workers=1, progress=False)
        assert (generated / "train" / "000000.png").stat().st_mtime_ns == before
        with pytest.raises(ValueError, match="not empty"):  # a real difference is still refused
            generate_dataset(generated, ShapesConfig(seed=3, relation_captions=2), COUNTS, workers=1,
                             progress=False)
    finally:
        generate_dataset(generated, ShapesConfig(seed=3), COUNTS, workers=1, progress=False, overwrite=True)


def test_mix_options_shift_counts_and_add_converse_relations():
    mix = ShapesConfig(object_count_weights=(1, 2, 3), same_group_prob=0.5, relation_captions=2)
    n_objects = {1: 0, 2: 0, 3: 0}
    grouped = converses = 0
    for i in range(300):
        _, row = make_example(mix, "train", i)
        n_objects[len(row["objects"])] += 1
        grouped += bool(re.search(r"\b(two|three) ", row["captions"][0]))
        relations = [c for c in row["captions"] if re.search(r" (above|below|to the left of|to the right of) ", c)]
        assert len(relations) in (0, 2), row["captions"]  # a relation always comes with its converse
        for caption in row["captions"]:
            _check_caption(caption, row["objects"])
        if relations:
            rels = [REL_WORDS[re.search(r" (above|below|to the left of|to the right of) ", c).group(1)]
                    for c in relations]
            assert rels[1] == CONVERSE[rels[0]]
            converses += 1
    assert n_objects[3] > n_objects[2] > n_objects[1] > 20  # odds 1:2:3
    assert grouped > 60 and converses > 60
    plain = [len(make_example(ShapesConfig(), "train", i)[1]["objects"]) for i in range(300)]
    assert plain.count(3) < n_objects[3]


def test_relation_pairs_all_relates_every_uniquely_named_pair():
    one = ShapesConfig(object_count_weights=(0, 0, 1), same_group_prob=0.0, relation_captions=2)
    every = ShapesConfig(object_count_weights=(0, 0, 1), same_group_prob=0.0, relation_captions=2,
                         relation_pairs="all")
    n_rel = {"one": 0, "all": 0}
    for i in range(100):
        _, row_one = make_example(one, "train", i)
        _, row = make_example(every, "train", i)
        assert row["objects"] == row_one["objects"]  # same scenes: only the captions change
        for caption in row["captions"]:
            _check_caption(caption, row["objects"])
        noun = r"(?:a|an) (?:(?:small|large) )?(\w+ \w+)"
        pattern = rf"\b{noun} (?:above|below|to the left of|to the right of) {noun}"
        related = [(m.group(1), m.group(2)) for c in row["captions"] if (m := re.search(pattern, c))]
        names = {f"{o['colour']} {o['kind']}" for o in row["objects"]}
        if len(names) == 3:  # three uniquely named objects: all three pairs, each phrased both ways
            assert sorted(related) == sorted((a, b) for a in names for b in names if a != b), row["captions"]
        n_rel["all"] += len(related)
        n_rel["one"] += sum(bool(re.search(pattern, c)) for c in row_one["captions"])
    assert n_rel["all"] > 2 * n_rel["one"] > 0


@pytest.mark.parametrize("bad, message", [
    (dict(object_count_weights=(1, 2)), "3 non-negative odds"),
    (dict(object_count_weights=(0, 0, 0)), "not all zero"),
    (dict(same_group_prob=1.5), "probability"),
    (dict(relation_captions=3), "must be 1"),
    (dict(relation_pairs="some"), "must be 'one'"),
])
def test_bad_mix_options_say_what_is_allowed(bad, message):
    with pytest.raises(ValueError, match=message):
        ShapesConfig(**bad)


def test_cli_writes_the_mix_it_is_asked_for(tmp_path, capsys):
    from data.shapes import main

    main(["--out", str(tmp_path), "--n-train", "12", "--n-validation", "0", "--n-test", "0", "--n-heldout", "0",
          "--object-count-weights", "0", "0", "1", "--same-group-prob", "1", "--relation-captions", "2",
          "--relation-pairs", "all", "--workers", "1"])
    config = json.loads((tmp_path / "shapes_info.json").read_text())["config"]
    assert config["object_count_weights"] == [0, 0, 1] and config["relation_captions"] == 2
    assert config["relation_pairs"] == "all"
    rows = [json.loads(line) for line in (tmp_path / "train" / "metadata.jsonl").read_text().splitlines()]
    assert all(len(r["objects"]) == 3 for r in rows)  # odds 0:0:1 → three objects, every one grouped
    assert all(re.match(r"(a picture of |an image of )?(two|three) ", r["captions"][0]) for r in rows)
    assert "wrote 12 images" in capsys.readouterr().out
