"""Grounding: object masks travel with the image through the loader, words find the objects they name,
and the loss pulls a word's cross-attention onto its object."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from data.loading import LoadConfig, load_captioned
from data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITION_WORDS,
    ShapesConfig,
    generate_dataset,
    object_mask,
    object_words,
    place_words,
)
from diffusion.grounding import (
    RELATION_MARGIN,
    GroundingRecorder,
    grounding_loss,
    relation_loss,
    relation_pairs,
    token_targets,
)
from tests.tiny import tiny_pipeline, tiny_text_encoder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("grounding") / "set"
    return generate_dataset(out, ShapesConfig(size=32, seed=3), {"train": 16}, workers=1, progress=False)


def object_colour(item, k) -> str:
    """The palette colour (object or background) nearest the median pixel under object k's mask."""
    pixels = (item["pixel_values"] + 1) * 127.5  # (3, R, R)
    median = pixels[:, item["object_masks"][k] >= 0.5].median(dim=1).values
    palette = {**COLOURS, **BACKGROUNDS}
    return min(palette, key=lambda name: (median - torch.tensor(palette[name]).float()).norm().item())


def test_object_masks_sit_on_their_objects(shapes):
    ds = load_captioned(shapes / "train", LoadConfig(resolution=32, caption_column="captions", object_masks=True))
    for i in range(len(ds)):
        item, row = ds[i], ds.hf[ds.rows[i]]
        assert item["object_masks"].shape == (len(row["objects"]), 32, 32)
        for k, obj in enumerate(row["objects"]):
            assert torch.equal(item["object_masks"][k], torch.from_numpy(object_mask(obj, 32)).float())
            assert item["object_words"][k] == object_words(obj) >= {obj["colour"], obj["kind"]}
            assert item["object_places"][k] == place_words(obj["row"], obj["col"])
            assert object_colour(item, k) == obj["colour"]


def test_object_masks_follow_resize_and_flip(shapes):
    cfg = dict(resolution=16, caption_column="captions", object_masks=True)
    plain = load_captioned(shapes / "train", LoadConfig(**cfg))
    flipping = load_captioned(shapes / "train", LoadConfig(**cfg, hflip=True))
    flipped = 0
    for i in range(len(plain)):
        torch.manual_seed(i)
        a = plain[i]
        torch.manual_seed(i)
        b = flipping[i]
        mirrored = torch.equal(b["pixel_values"], a["pixel_values"].flip(-1))
        flipped += mirrored
        expected = a["object_masks"].flip(-1) if mirrored else a["object_masks"]
        assert torch.equal(b["object_masks"], expected)
        mirror = {"left": "right", "right": "left"}
        assert b["object_places"] == ([{mirror.get(w, w) for w in p} for p in a["object_places"]] if mirrored
                                      else a["object_places"])
        for k, (mask, places) in enumerate(zip(b["object_masks"], b["object_places"], strict=True)):
            x = (mask.sum(0) * torch.arange(16)).sum() / mask.sum()  # the mask's centre column
            assert ("left" in places) == (x < 16 / 3) and ("right" in places) == (x > 32 / 3), (k, places)
        for k, obj in enumerate(plain.hf[plain.rows[i]]["objects"]):  # the half-size mask: the full one, pooled
            pooled = F.avg_pool2d(torch.from_numpy(object_mask(obj, 32)).float()[None], 2)[0]
            pooled = pooled.flip(-1) if mirrored else pooled
            assert (b["object_masks"][k] - pooled).abs().max() < 0.35
            assert abs(b["object_masks"][k].sum() - pooled.sum()) < 0.15 * pooled.sum()
    assert 0 < flipped < len(plain)


def test_object_masks_need_an_objects_column(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red square"}\n')
    with pytest.raises(ValueError, match="no 'objects' column"):
        load_captioned(tmp_path, LoadConfig(object_masks=True))


def word_encoding(*captions: str) -> SimpleNamespace:
    """One token per word, with start/end tokens, as the shipped tokenizer gives the shapes captions."""
    words = [c.split() for c in captions]
    return SimpleNamespace(words=words, word_ids=[[None, *range(len(w)), None] for w in words])


def test_words_find_the_objects_they_name():
    enc = tiny_text_encoder().encode(["a red circle above two blue squares", ""])
    masks = torch.zeros(3, 8, 8)
    masks[0, :2, :2] = 1  # the red circle
    masks[1, 5:, :2] = 1  # blue square 1
    masks[2, 5:, 5:] = 1  # blue square 2
    words = [{"red", "circle", "circles", "small"}, {"blue", "square", "squares", "large"},
             {"blue", "square", "squares", "small"}]
    L = enc.context.shape[1]
    targets, valid = token_targets(enc, [masks, torch.zeros(0, 8, 8)], [words, []], L)
    assert targets.shape == (2, L, 8, 8) and not valid[1].any()  # the empty (dropped) caption: nothing
    squares = masks[1:].amax(0)
    for i, wid in enumerate(enc.word_ids[0]):
        word = None if wid is None else enc.words[0][wid]
        expected = {"red": masks[0], "circle": masks[0], "blue": squares, "squares": squares}.get(word)
        assert bool(valid[0, i]) == (expected is not None), word  # <start>, a, above, two, <end>: free
        if expected is not None:
            assert torch.equal(targets[0, i], expected), word


def test_place_words_name_the_cell_as_its_phrase_does():
    assert place_words(0, 0) == {"top", "left"} and place_words(1, 1) == {"center"}
    assert place_words(2, 1) == {"bottom"} and place_words(1, 2) == {"right"}
    for (row, col), phrase in POSITION_WORDS.items():
        assert place_words(row, col) <= set(phrase.split())
        assert ("top" in place_words(row, col)) == (row == 0) and ("left" in place_words(row, col)) == (col == 0)


def test_place_words_point_at_the_object_their_phrase_places():
    caption = "a red circle in the top left , a blue square at the top and a green cross to the left of a red circle"
    enc = word_encoding(caption)
    masks = torch.zeros(3, 9, 9)
    masks[0, :3, :3] = 1  # red circle, top left
    masks[1, :3, 3:6] = 1  # blue square, top
    masks[2, 6:, 3:6] = 1  # green cross, bottom (the caption's relation is false; only its words matter)
    words = [{"red", "circle", "circles", "small"}, {"blue", "square", "squares", "small"},
             {"green", "cross", "crosses", "small"}]
    places = [{"top", "left"}, {"top"}, {"bottom"}]
    L = len(enc.word_ids[0])
    plain, plain_valid = token_targets(enc, [masks], [words], L)
    targets, valid = token_targets(enc, [masks], [words], L, [places])
    seen = []
    for i, wid in enumerate(enc.word_ids[0]):
        word = None if wid is None else enc.words[0][wid]
        if word in ("top", "left"):
            assert not plain_valid[0, i]  # without places, position words stay free
            seen.append((word, bool(valid[0, i]), None if not valid[0, i] else
                         next(k for k in range(3) if torch.equal(targets[0, i], masks[k]))))
        elif word is not None:
            assert bool(valid[0, i]) == bool(plain_valid[0, i]) and torch.equal(targets[0, i], plain[0, i]), word
    # "top" of the circle, "left" of the circle, "top" of the square; "left" of "to the left of": free
    assert seen == [("top", True, 0), ("left", True, 0), ("top", True, 1), ("left", False, None)]
    # with relations, the "left" of "to the left of" points at the green cross, the object it places
    with_relations, rel_valid = token_targets(enc, [masks], [words], L, [places], relations=True)
    relation = [i for i, wid in enumerate(enc.word_ids[0]) if wid is not None and enc.words[0][wid] == "left"][-1]
    assert rel_valid[0, relation] and torch.equal(with_relations[0, relation], masks[2])
    assert torch.equal(rel_valid[0, :relation], valid[0, :relation])


def test_relation_words_point_at_the_object_they_place():
    enc = word_encoding("a blue square above a red circle and a red cross below a blue square")
    words = enc.words[0]
    masks = torch.eye(3)[:, :, None].expand(3, 3, 3).clone()  # object k: row k of a 3×3 image
    objects = [{"blue", "square", "squares", "small"}, {"red", "circle", "circles", "small"},
               {"red", "cross", "crosses", "large"}]
    L = len(enc.word_ids[0])
    free, free_valid = token_targets(enc, [masks], [objects], L)
    targets, valid = token_targets(enc, [masks], [objects], L, relations=True)
    for i, wid in enumerate(enc.word_ids[0]):
        word = None if wid is None else words[wid]
        if word in ("above", "below"):
            assert not free_valid[0, i] and valid[0, i]
            assert torch.equal(targets[0, i], masks[0] if word == "above" else masks[2]), word  # the phrase before
        else:
            assert bool(valid[0, i]) == bool(free_valid[0, i]) and torch.equal(targets[0, i], free[0, i]), word


def test_loss_is_zero_when_each_word_looks_only_inside_its_object():
    targets = torch.zeros(1, 3, 4, 4)
    targets[0, 1, :2, :2] = 1  # token 1 names the top-left quarter
    valid = torch.tensor([[False, True, False]])
    inside = torch.zeros(1, 16, 3)
    inside[0, :, 0] = 1  # every position attends to token 0 …
    corner = targets[0, 1].flatten().bool()
    inside[0, corner] = torch.tensor([0.0, 1.0, 0.0])  # … except the corner, which attends to token 1
    uniform = torch.full((1, 16, 3), 1 / 3)
    inside, uniform = inside.transpose(1, 2), uniform.transpose(1, 2)  # maps are key-major: (B, L, N)
    token_in, pixel_in = grounding_loss([((4, 4), inside)], targets, valid)
    token_uni, pixel_uni = grounding_loss([((4, 4), uniform)], targets, valid)
    assert token_in.item() == pytest.approx(0, abs=1e-6) and pixel_in.item() < 1e-4
    assert token_uni.item() == pytest.approx(0.75**2)  # a quarter of the mass inside
    assert pixel_uni > pixel_in
    none = grounding_loss([((4, 4), uniform)], targets, torch.zeros_like(valid))
    assert none[0].item() == none[1].item() == 0


def test_relation_pairs_name_both_phrases_and_the_axis():
    enc = word_encoding("a picture of a small red circle to the left of a blue square , and a green cross at the top",
                        "two red circles", "a blue square below a large yellow triangle")
    L = max(len(ids) for ids in enc.word_ids) + 2  # padded context
    a_tokens, b_tokens, prompt, axis, sign = relation_pairs(enc, L)
    assert prompt.tolist() == [0, 2] and axis.tolist() == [1, 0] and sign.tolist() == [1.0, -1.0]

    def named(row, b):
        return [enc.words[b][enc.word_ids[b][i]] for i in row.nonzero()[:, 0].tolist()]

    assert named(a_tokens[0], 0) == ["small", "red", "circle"] and named(b_tokens[0], 0) == ["blue", "square"]
    assert named(a_tokens[1], 2) == ["blue", "square"] and named(b_tokens[1], 2) == ["large", "yellow", "triangle"]
    assert a_tokens.shape == b_tokens.shape == (2, L)
    none = relation_pairs(word_encoding("a red circle in the top left", ""), L)  # a place, not a relation
    assert none[0].shape == (0, L) and len(none[2]) == 0


def test_relation_loss_asks_for_the_pair_in_the_named_order():
    enc = word_encoding("a red circle above a blue square", "a red circle to the right of a blue square")
    pairs = relation_pairs(enc, 12)
    a_tokens, b_tokens, prompt = pairs[:3]

    def maps(red_cell, blue_cell):
        """(B, L, 6·6) maps: the red circle's tokens look at one cell of a 3×3 grid, the blue square's at another."""
        a = torch.full((2, 12, 6, 6), 1e-3)
        for p, b in enumerate(prompt.tolist()):
            for tokens, (row, col) in ((a_tokens[p], red_cell), (b_tokens[p], blue_cell)):
                for tok in tokens.nonzero()[:, 0].tolist():
                    a[b, tok, 2 * row:2 * row + 2, 2 * col:2 * col + 2] = 1
        return [((6, 6), a.flatten(2))]

    # caption 0 wants red above blue, caption 1 red right of blue
    right = relation_loss(maps((0, 2), (2, 0)), pairs)  # red top right, blue bottom left: both hold
    wrong = relation_loss(maps((2, 0), (0, 2)), pairs)  # both inverted, by two cells (2/3 of the side)
    assert right.item() == pytest.approx(0, abs=1e-6)
    assert wrong.item() == pytest.approx(RELATION_MARGIN + 2 / 3, abs=0.01)
    same = relation_loss(maps((1, 1), (1, 1)), pairs)  # the pair in one place: exactly the margin short
    assert same.item() == pytest.approx(RELATION_MARGIN, abs=1e-4)
    a = maps((1, 1), (1, 1))[0][1].requires_grad_()
    relation_loss([((6, 6), a)], pairs).backward()
    assert a.grad.abs().sum() > 0
    assert relation_loss(maps((2, 0), (0, 2)), relation_pairs(word_encoding("a red circle", "x"), 12)).item() == 0


def test_gradient_pulls_a_words_attention_onto_its_object(shapes):
    """Only the grounding loss, a few optimiser steps: the words' maps move onto their objects."""
    pipe = tiny_pipeline()
    unet, enc_model = pipe.unet.train(), pipe.text_encoder
    ds = load_captioned(shapes / "train", LoadConfig(resolution=16, caption_column="text", object_masks=True))
    items = [ds[i] for i in range(8)]
    x = torch.stack([it["pixel_values"] for it in items])
    enc = enc_model.encode([it["caption"] for it in items])
    targets, valid = token_targets(enc, [it["object_masks"] for it in items], [it["object_words"] for it in items],
                                   enc.context.shape[1])
    assert valid.sum() >= 16
    t = torch.full((8,), 500)
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        recorder = GroundingRecorder()
        with unet.record_attention(recorder):
            unet(x, t, enc.context, enc.mask)
        assert len(recorder.maps) == sum(b.kind == "cross" for b in unet.attention_layers.values())
        token, pixel = grounding_loss(recorder.maps, targets, valid)
        losses.append(token.item())
        optimizer.zero_grad()
        (token + 0.05 * pixel).backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0], losses


def test_training_with_grounding_needs_and_uses_object_masks(tmp_path, shapes):
    tiny_pipeline().save_pretrained(tmp_path / "init")
    common = ["--init", str(tmp_path / "init"), "--resolution", "16", "--batch-size", "4", "--warmup", "1",
              "--validate-every", "100", "--mixed-precision", "no", "--grounding-weight", "0.01", "--steps", "2"]
    train.main([*common, "--data", str(shapes / "train"), "--caption-column", "captions", "--out", str(tmp_path / "r")])
    state = train.checkpoints(tmp_path / "r" / "checkpoints")[-1][1] / "state.json"
    assert '"grounding_weight": 0.01' in state.read_text()
    train.main([*common, "--data", str(shapes / "train"), "--caption-column", "captions", "--ground-positions",
                "--ground-relations", "--out", str(tmp_path / "p")])
    state = (train.checkpoints(tmp_path / "p" / "checkpoints")[-1][1] / "state.json").read_text()
    assert '"ground_positions": true' in state and '"ground_relations": true' in state
    train.main([*common, "--data", str(shapes / "train"), "--caption-column", "captions", "--relation-weight", "0.1",
                "--out", str(tmp_path / "q")])
    logs = [json.loads(line) for line in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    assert [set(step) >= {"relation", "grounding_token"} and step["relation"] >= 0 for step in logs] == [True, True]
    assert '"relation_weight": 0.1' in (train.checkpoints(tmp_path / "q" / "checkpoints")[-1][1]
                                         / "state.json").read_text()
    for flag in ("ground_positions", "ground_relations"):
        with pytest.raises(ValueError, match="grounding-weight"):
            train.TrainConfig(**{flag: True})
    user = tmp_path / "user"  # a folder of one's own: captions, no object masks
    user.mkdir()
    Image.new("RGB", (32, 32), "red").save(user / "a.png")
    (user / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red square"}\n')
    with pytest.raises(ValueError, match="grounding"):
        train.main([*common, "--data", str(user), "--out", str(tmp_path / "bad")])


def test_object_words_name_colour_kind_plural_and_size():
    assert object_words({"kind": "cross", "colour": "red", "size": "small"}) == {"red", "cross", "crosses", "small"}
    assert np.array_equal(object_mask({"kind": "square", "box": [0, 0, 2, 2]}, 4)[:2, :2], np.ones((2, 2), bool))
