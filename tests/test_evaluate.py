"""evaluate.py: prompts follow the data's grammar, scoring follows GenEval's rule, a perfect model scores 1."""

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
from data.detector import detect
from data.shapes import PLURALS, Scene, ShapeObject, ShapesConfig, render
from diffusion.layout import OBJECT_GUIDANCE, RELATION_GUIDANCE
from tests.tiny import tiny_pipeline

CELLS = {"above": ((0, 1), (2, 1)), "below": ((2, 1), (0, 1)), "left of": ((1, 0), (1, 2)),
         "right of": ((1, 2), (1, 0))}


def draw(objects: list[tuple[str, str, tuple[int, int]]], size: int = 32) -> Image.Image:
    """Render (colour, kind, (row, col)) objects with the data generator's own renderer."""
    side = 0.25 * size
    scene = Scene("white", [ShapeObject(kind, colour, "large", r, c,
                                        ((c + 0.5) * size / 3 - side / 2, (r + 0.5) * size / 3 - side / 2,
                                         (c + 0.5) * size / 3 + side / 2, (r + 0.5) * size / 3 + side / 2))
                            for colour, kind, (r, c) in objects])
    return render(scene, size)


def perfect_image(prompt: evaluate.Prompt, rng: random.Random, wrong_colour: bool = False):
    """What a model that follows the prompt exactly would draw (colours parsed from the text)."""
    colours = [c for c, _ in prompt.named]
    if wrong_colour:
        colours = ["orange" if c != "orange" else "red" for c in colours]
    kinds = [k for _, k in prompt.objects]
    if prompt.count:
        return draw([(colours[0], kinds[0], divmod(cell, 3)) for cell in rng.sample(range(9), prompt.count)])
    if prompt.relation:
        cells = CELLS[prompt.relation[1]]
        return draw([(colours[i], kinds[i], cells[i]) for i in range(2)])
    if prompt.cell:
        return draw([(colours[0], kinds[0], prompt.cell)])
    return draw([(colours[i], kinds[i], (i, i)) for i in range(len(kinds))])


class FakePipe:
    """Stands in for TextToImagePipeline: draws the prompt perfectly (or with wrong colours)."""

    def __init__(self, prompts, wrong_colour=False):
        self.by_text = {p.text: p for p in prompts}
        self.wrong_colour = wrong_colour
        self.unet = type("U", (), {"config": type("C", (), {"sample_size": 32})})()

    def __call__(self, text, num_images, **kwargs):
        rng = random.Random(kwargs["seed"])
        prompt = self.by_text[text]
        images = [perfect_image(prompt, rng, self.wrong_colour) for _ in range(num_images)]
        return type("R", (), {"images": images, "attention": PerfectMaps(prompt, images)})()


class PerfectMaps:
    """Attention that looks exactly at the object: every word's map is the object's mask."""

    def __init__(self, prompt, images):
        self.words, self.images = prompt.words + prompt.places, images

    def layers(self, kind):
        return ["down.1.0.cross_attn", "up.1.0.cross_attn"]

    def word_maps(self, image, normalize, layer=None):
        mask = torch.from_numpy(detect(self.images[image])[0].mask).float()
        if layer == "up.1.0.cross_attn":  # a layer that looks everywhere but at the object
            mask = 1 - mask
        return {w: mask for w in self.words}


def test_prompts_use_the_training_grammar_and_hold_out_what_training_never_saw():
    prompts = evaluate.make_prompts(20, seed=0)
    held = set(ShapesConfig().held_out_pairs)
    assert {p.task for p in prompts} == set(evaluate.TASKS) and len(prompts) == 20 * len(evaluate.TASKS)
    for p in prompts:
        for colour, kind in p.named:
            assert colour in p.text and (kind in p.text or PLURALS[kind] in p.text), p.text
        if p.task == "unseen":
            triple = (p.named[0][1], p.relation[1], p.named[1][1]) if p.relation else None
            held_relation = triple in ShapesConfig().held_out_relations
            assert set(p.named) & held or held_relation, p.text
        else:
            assert not set(p.named) & held, p.text
    assert evaluate.make_prompts(5, seed=1)[0].text == evaluate.make_prompts(5, seed=1)[0].text


def test_a_perfect_model_scores_one_and_a_colour_blind_one_fails_colour_tasks(monkeypatch):
    prompts = evaluate.make_prompts(3, seed=0)
    monkeypatch.setattr(evaluate, "make_prompts", lambda per_task, seed: prompts)
    everything = prompts + evaluate.placement_prompts(0)
    report = evaluate.evaluate(FakePipe(everything), per_task=3, images_per_prompt=2, progress=False)
    for task in (*evaluate.TASKS, *evaluate.UNSEEN_PARTS, "placement"):
        assert report["scores"][task]["score"] == 1.0, task
    # the unseen task split into its held-out pairs and held-out relations
    n_pairs = sum(p.task == "unseen" and not p.relation for p in prompts)
    assert 0 < n_pairs < 3
    assert report["scores"]["unseen_pairs"]["images"] == n_pairs * 2
    assert report["scores"]["unseen_relations"]["images"] == (3 - n_pairs) * 2
    assert (f"held-out colour–shape pairs 1.000 of {n_pairs * 2} images (" in evaluate.markdown(report, "m"))
    assert report["scores"]["placement"]["images"] == 9 * 2
    assert "the one object sits in the named cell in 1.000 of 18 images" in evaluate.markdown(report, "m")
    assert report["scores"]["overall"]["score"] == 1.0
    assert report["attention"]["pointing_accuracy"] == 1.0 and report["attention"]["miou"] == 1.0
    assert report["attention"]["by_layer"] == {"down.1.0.cross_attn": {"pointing_accuracy": 1.0, "miou": 1.0},
                                               "up.1.0.cross_attn": {"pointing_accuracy": 0.0, "miou": 0.0}}
    assert "| up.1.0.cross_attn | 0.000 | 0.000 |" in evaluate.markdown(report, "m")
    # "top" and "left" of each placement prompt peak on the object, in the named cell: 13 words × 2 images
    assert report["attention"]["place_pointing"] == 1.0 and report["attention"]["place_words"] == 13 * 2
    assert "| position words peaking in the named cell (26 words; chance 0.111) | 1.000 |" in evaluate.markdown(
        report, "m")
    assert report["attention"]["words"] == 3 * 2 * (1 + 2) + sum(p.task == "unseen" and not p.relation
                                                                  for p in prompts) * 2 * 2
    wrong = evaluate.evaluate(FakePipe(everything, wrong_colour=True), per_task=3, images_per_prompt=2,
                              progress=False)
    monkeypatch.setattr(PerfectMaps, "word_maps", lambda self, image, normalize, layer=None: {  # turned 180°
        w: torch.from_numpy(detect(self.images[image])[0].mask).float().flip(0, 1) for w in self.words})
    turned = evaluate.evaluate(FakePipe(everything), per_task=3, images_per_prompt=2, progress=False)
    assert turned["attention"]["place_pointing"] == pytest.approx(2 / 26)  # only "center" still hits
    assert wrong["scores"]["colour"]["score"] == 0.0 and wrong["scores"]["colour_attribution"]["score"] == 0.0
    assert wrong["scores"]["single_object"]["score"] == 1.0  # shape only: colour is not a constraint there
    assert wrong["scores"]["unseen_pairs"]["score"] == 0.0  # a held-out pair is a colour on a kind


def test_geneval_rule_extra_or_missing_objects_fail():
    p = evaluate.Prompt("colour", "a red circle", [("red", "circle")], [("red", "circle")])
    assert evaluate.correct(p, detect(draw([("red", "circle", (1, 1))])), 32)
    assert not evaluate.correct(p, detect(draw([("red", "circle", (1, 1)), ("blue", "square", (0, 0))])), 32)
    assert not evaluate.correct(p, detect(draw([("red", "square", (1, 1))])), 32)
    pos = evaluate.Prompt("position", "a red circle above a blue square", [("red", "circle"), ("blue", "square")],
                          [(None, "circle"), (None, "square")], relation=(0, "above", 1))
    assert evaluate.correct(pos, detect(draw([("red", "circle", (0, 1)), ("blue", "square", (2, 1))])), 32)
    assert not evaluate.correct(pos, detect(draw([("red", "circle", (2, 1)), ("blue", "square", (0, 1))])), 32)


def test_placement_needs_the_named_cell():
    prompts = evaluate.placement_prompts(0)
    assert [p.cell for p in prompts] == [divmod(i, 3) for i in range(9)]
    assert prompts[0].text.endswith(" in the top left") and prompts[8].text.endswith(" in the bottom right")
    p = prompts[2]  # the top right
    (c, k), = p.named
    assert evaluate.correct(p, detect(draw([(c, k, (0, 2))])), 32)
    assert not evaluate.correct(p, detect(draw([(c, k, (0, 1))])), 32)  # one cell off
    assert not evaluate.correct(p, detect(draw([(c, k, (0, 2)), (c, k, (2, 0))])), 32)  # an extra object
    assert [p.places for p in prompts[:3]] == [["left", "top"], ["top"], ["right", "top"]]


def test_relation_direction_tells_right_from_inverted():
    prompt = next(p for p in evaluate.make_prompts(8, 0) if p.task == "position")
    (ca, ka), (cb, kb) = prompt.named
    rel = prompt.relation[1]
    here, there = CELLS[rel]
    side_by_side = ((1, 0), (1, 2)) if rel in ("above", "below") else ((0, 1), (2, 1))  # the relation's axis ties

    def direction(cell_a, cell_b=None):
        objects = [(ca, ka, cell_a)] + ([(cb, kb, cell_b)] if cell_b else [])
        return evaluate.relation_direction(prompt, detect(draw(objects)), 32)

    assert direction(here, there) == "right"
    assert direction(there, here) == "inverted"
    assert direction(*side_by_side) == "neither"
    assert direction(here) is None  # an object missing: not a relation outcome
    colour = next(p for p in evaluate.make_prompts(1, 0) if p.task == "colour")
    assert evaluate.relation_direction(colour, [], 32) is None


def test_wilson_interval():
    lo, hi = evaluate.wilson(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73  # known value: 0.722
    assert evaluate.wilson(0, 0) == (0.0, 1.0)


def test_localisation():
    import numpy as np
    import torch

    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 2:4] = True
    heat = torch.zeros(8, 8)
    heat[2:4, 2:4] = 1.0
    hit, ious = evaluate.localisation(heat, mask)
    assert hit and ious == [1.0] * len(evaluate.TAUS)
    miss, ious = evaluate.localisation(torch.roll(heat, 4, 0), mask)
    assert not miss and max(ious) == 0.0


@pytest.mark.slow
def test_quick_run_on_a_real_pipeline_writes_reports(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    report = evaluate.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "eval"), "--quick",
                            "--per-task", "1", "--steps", "2"])
    assert (tmp_path / "eval" / "report.md").read_text().startswith("## Evaluation")
    assert set(report["scores"]) == {*evaluate.TASKS, *evaluate.UNSEEN_PARTS, "placement", "overall"}
    assert 0.0 <= report["attention"]["miou"] <= 1.0
    assert 0.0 <= report["clip_score"] <= 100.0 and "CLIP-score" in (tmp_path / "eval" / "report.md").read_text()
    # Sampled as the app samples, relation guidance included, and the report says so.
    assert report["settings"]["relation_guidance"] == RELATION_GUIDANCE
    assert report["settings"]["object_guidance"] == OBJECT_GUIDANCE
    assert (f"relation guidance {RELATION_GUIDANCE:g}, object guidance {OBJECT_GUIDANCE:g},"
            in (tmp_path / "eval" / "report.md").read_text())


def test_layout_guidance_reaches_every_prompt(monkeypatch):
    prompts = evaluate.make_prompts(1, seed=0)
    monkeypatch.setattr(evaluate, "make_prompts", lambda per_task, seed: prompts)
    seen = []

    class Recording(FakePipe):
        def __call__(self, text, num_images, **kwargs):
            seen.append((kwargs["relation_guidance"], kwargs["object_guidance"]))
            return super().__call__(text, num_images, **kwargs)

    pipe = Recording(prompts + evaluate.placement_prompts(0))
    report = evaluate.evaluate(pipe, per_task=1, images_per_prompt=1, progress=False, relation_guidance=7.0,
                               object_guidance=3.0)
    assert seen == [(7.0, 3.0)] * (len(prompts) + 9)
    assert report["settings"]["relation_guidance"] == 7.0 and report["settings"]["object_guidance"] == 3.0


def test_clip_score_prefers_the_true_caption():
    from data.shapes import make_example

    scorer = evaluate.ClipScorer(Path(__file__).resolve().parent.parent / "weights" / "default" / "clip")
    examples = [make_example(ShapesConfig(size=32, seed=7), "test", i) for i in range(8)]
    images = [im for im, _ in examples]
    true = scorer(images, [row["text"] for _, row in examples])
    shifted = scorer(images, [row["text"] for _, row in examples[1:] + examples[:1]])  # someone else's caption
    assert all(0 <= s <= 100 for s in true + shifted)
    assert sum(t > s for t, s in zip(true, shifted, strict=True)) >= 6
    texts = [row["text"] for _, row in examples]
    assert sum(p == i for i, p in enumerate(scorer.pick(images, texts))) >= 5  # zero-shot: its own of the eight


def captioned_folder(root: Path, colours: dict[str, tuple[int, int, int]], size: int = 16) -> Path:
    """train/ and heldout/ splits of flat-coloured squares on white, captioned by their colour's name."""
    import json

    for split, names in (("train", list(colours)[:-1]), ("heldout", list(colours)[-1:])):
        (root / split).mkdir(parents=True)
        with (root / split / "metadata.jsonl").open("w") as f:
            for i, name in enumerate(names):
                im = Image.new("RGB", (size, size), "white")
                im.paste(colours[name], (3, 3, size - 3, size - 3))
                im.save(root / split / f"{i}.png")
                f.write(json.dumps({"file_name": f"{i}.png", "text": f"a {name} thing"}) + "\n")
    return root


def test_retrieval_ranks_the_captions_own_picture():
    # 0.6 is nearer 1.0 than 0.0 and -1.0 nearer 0.0 than 0.6: no ties for the noise to break
    pictures = torch.stack([torch.full((3, 16, 16), v) for v in (-1.0, 0.0, 0.6, 1.0)])
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    samples = pictures[[2, 0]] + 0.05 * noise
    assert evaluate.rank_of_own(samples, pictures, [2, 0]) == [0, 0]
    assert evaluate.rank_of_own(samples, pictures, [3, 1]) == [1, 1]  # second nearest


def test_foreground_is_what_differs_from_the_border():
    x = torch.ones(3, 16, 16)
    x[:, 4:8, 4:12] = -1
    fg = evaluate.foreground(x)
    assert fg.sum() == 32 and fg[5, 5] and not fg[0, 0]


def test_retrieval_report_on_a_real_pipeline(tmp_path, monkeypatch):
    """A model that draws each caption's own picture scores top-1 = 1 on seen and held-out captions."""
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "black": (0, 0, 0)}
    folder = captioned_folder(tmp_path / "data", colours)
    pipe = tiny_pipeline()
    real_call = type(pipe).__call__

    def draws_the_caption(self, prompts, **kw):
        result = real_call(self, prompts, **kw)
        for i, prompt in enumerate(prompts):
            im = Image.new("RGB", (16, 16), "white")
            im.paste(colours[prompt.split()[1]], (3, 3, 13, 13))
            result.images[i] = im
        return result

    monkeypatch.setattr(type(pipe), "__call__", draws_the_caption)
    report = evaluate.evaluate_retrieval(pipe, str(folder), steps=2, sheet=tmp_path / "sheet.png")
    assert report["seen"]["top1"] == 1.0 and report["seen"]["captions"] == 3 and report["seen"]["candidates"] == 3
    assert report["heldout"]["top1"] == 1.0 and report["heldout"]["candidates"] == 4
    assert report["seen"]["chance_top1"] == pytest.approx(1 / 3)
    assert 0 <= report["foreground_pointing"]["score"] <= 1 and report["foreground_pointing"]["words"] > 0
    assert Image.open(tmp_path / "sheet.png").size[0] > 0 and Image.open(tmp_path / "sheet_heldout.png").size[0] > 0
    assert "top-1" in evaluate.retrieval_markdown(report, "tiny")
    assert "category" not in report["seen"] and "clip_score" not in report["seen"]  # no such column, no CLIP
    clip = evaluate.ClipScorer(Path(__file__).resolve().parent.parent / "weights" / "default" / "clip")
    scored = evaluate.evaluate_retrieval(pipe, str(folder), steps=2, clip=clip)
    for split in ("seen", "heldout"):  # the samples are the own pictures here: the same score
        assert 0 <= scored[split]["clip_score"] <= 100
        assert scored[split]["clip_score"] == pytest.approx(scored[split]["clip_score_own_pictures"], abs=0.5)
    assert "CLIP-score" in evaluate.retrieval_markdown(scored, "tiny")


def test_noun_zero_shot_check_counts_samples_nearest_their_own_prompt(tmp_path):
    import json

    (tmp_path / "train").mkdir()
    with (tmp_path / "train" / "metadata.jsonl").open("w") as f:
        for i, text in enumerate(["a green frog", "a blue frog", "a red apple"]):
            Image.new("RGB", (16, 16), "white").save(tmp_path / "train" / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    seen = []

    class FirstPrompt:  # a CLIP that names everything after the first prompt
        def pick(self, images, texts):
            seen.append(texts)
            return [0] * len(images)

    report = evaluate.noun_sheet(tiny_pipeline(), str(tmp_path), tmp_path / "nouns.png", nouns=5, per_noun=3,
                                 steps=2, clip=FirstPrompt())
    assert report["nouns"] == ["frog", "apple"] and seen[0] == ["a frog", "an apple"]
    zs = report["zero_shot"]
    assert zs["samples"]["per_noun"] == {"frog": 1.0, "apple": 0.0} and zs["samples"]["score"] == 0.5
    assert zs["training_pictures"]["per_noun"] == {"frog": 1.0, "apple": 0.0} and zs["chance"] == 0.5
    assert "zero-shot check: 0.50" in evaluate.retrieval_markdown(
        {"nouns": report, "foreground_pointing": {"score": 0.0, "words": 0}, "settings": {"folder": "f"}}, "tiny")


def test_head_nouns_are_the_last_words_with_plurals_counted_as_their_singular():
    captions = ["a red apple", "apples", "green frogs", "a frog", "a frog", "glass", "a tall glass", "a 3"]
    assert evaluate.head_nouns(captions, 3) == ["frog", "apple", "glass"]  # "glass" is not the plural of "glas"
    assert evaluate.head_nouns(captions, 1) == ["frog"]


def test_noun_sheet_draws_a_row_per_noun(tmp_path):
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    folder = captioned_folder(tmp_path / "data", colours)
    report = evaluate.noun_sheet(tiny_pipeline(), str(folder), tmp_path / "nouns.png", nouns=5, per_noun=2, steps=2)
    assert report == {"nouns": ["thing"]}  # every caption ends in "thing"; no CLIP, no zero-shot check
    sheet = Image.open(tmp_path / "nouns.png")
    assert sheet.size == (90 + 5 * 16 * 3, 16 * 3 + 4)
    assert sheet.getpixel((90 + 3 * 48 + 24, 24)) == colours["red"]  # the training pictures, after a gap
    assert sheet.getpixel((90 + 4 * 48 + 24, 24)) == colours["green"]


def test_category_retrieval_counts_the_nearest_pictures_category_against_chance():
    pictures = torch.stack([torch.full((3, 16, 16), v) for v in (-1.0, -0.8, 0.6, 1.0)])
    categories = ["animals", "animals", "food", "plants"]
    samples = pictures[[1, 2, 3]] + 0.01  # nearest: 1 (animals), 2 (food), 3 (plants)
    scores = evaluate.category_scores(samples, pictures, categories, own=[0, 3, 2])
    assert scores["top1"] == pytest.approx(1 / 3)  # caption 0 (animals) hit; the others missed
    assert scores["chance"] == pytest.approx((0.5 + 0.25 + 0.25) / 3) and scores["categories"] == 3
    # the own pictures' nearest others: 0 → 1 (animals, hit), 3 → 2 (food ≠ plants), 2 → 3 (plants ≠ food)
    assert scores["own_pictures"] == pytest.approx(1 / 3)
