"""The shipped weights load offline and work (catches a broken, swapped or missing file)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel

import evaluate
from conditioning.clip_images import to_pixel_values
from conditioning.text_encoder import TextEncoder
from data.detector import detect
from data.shapes import ShapesConfig, make_example
from diffusion.layout import OBJECT_GUIDANCE, RELATION_GUIDANCE
from diffusion.pipeline import TextToImagePipeline
from diffusion.sampling import SAMPLERS

DEFAULT = Path(__file__).resolve().parent.parent / "weights" / "default"


def test_text_encoder_loads_offline_and_knows_the_shapes_words():
    enc = TextEncoder.from_pretrained(str(DEFAULT))
    assert enc.hidden_size == 256 and enc.max_length == 32
    out = enc.encode(["two small red circles to the left of a blue square", "a crème brûlée"])
    assert out.context.shape[0] == 2 and out.context.shape[2] == 256
    assert out.tokens[0][1:-1] == "two small red circles to the left of a blue square".split()  # one token a word
    assert out.unknown_words == [[], ["crème", "brûlée"]]


def test_shipped_clip_matches_captions_to_their_images():
    clip = CLIPModel.from_pretrained(DEFAULT / "clip").eval()
    enc = TextEncoder.from_pretrained(str(DEFAULT))
    config = ShapesConfig(size=32, seed=123)  # a seed the CLIP never trained on
    examples = [make_example(config, "test", i) for i in range(16)]
    texts = [row["text"] for _, row in examples]
    pixels = to_pixel_values(torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _ in examples]))
    ids = enc.tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = clip(**ids, pixel_values=pixels).logits_per_text  # (16 texts, 16 images)
    top1 = logits.argmax(dim=1)
    # Distinct scenes among 16: a working CLIP gets most right; a broken or random one about 1/16.
    assert (top1 == torch.arange(16)).float().mean() >= 0.6
    # The pipeline's text encoder is the same text tower as the CLIP's.
    for name, p in enc.model.named_parameters():
        torch.testing.assert_close(p, dict(clip.text_model.named_parameters())[name.removeprefix("text_model.")])


@pytest.fixture(scope="module")
def default_pipe():
    return TextToImagePipeline.from_pretrained(DEFAULT)  # dtype auto: what the app serves


def test_shipped_pipeline_loads_offline_and_generates(default_pipe):
    config = json.loads((DEFAULT / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == default_pipe.scheduler_config["prediction_type"] == "v_prediction"
    stored = load_file(DEFAULT / "unet" / "model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}  # 10 MB, under the Hub's 10 MiB LFS line
    result = default_pipe("a red circle", num_images=2, steps=8, seed=0, record_attention=True)
    assert [im.size for im in result.images] == [(32, 32)] * 2 and not result.warnings
    maps = result.attention.word_maps(0)
    assert set(maps) == {"a", "red", "circle"} and all(torch.isfinite(m).all() for m in maps.values())


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_no_sampler_saturates_on_the_shipped_model(default_pipe, sampler):
    # PITFALLS: DPM-Solver++ and Euler used naively on the cosine schedule give fully saturated noise.
    # The shapes world is plain backgrounds and flat colours: a sane sample is mostly smooth, and
    # nowhere near all-extreme pixels.
    images = default_pipe("a blue square", num_images=2, steps=20, seed=1, sampler=sampler).images
    pixels = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (2, 32, 32, 3)
    extreme = ((pixels < 8) | (pixels > 247)).mean()
    roughness = np.abs(np.diff(pixels, axis=2)).mean()  # mean neighbour difference, of 255
    assert extreme < 0.9 and roughness < 20, (sampler, extreme, roughness)
    blue = pixels[..., 2] - pixels[..., :2].mean(-1)
    assert (blue > 60).mean() > 0.02, sampler  # a blue thing is there


@pytest.mark.slow
def test_quick_evaluation_stays_above_its_floor(tmp_path):
    # Catches a broken model, not a re-measurement: floors far below the measured scores (model card).
    report = evaluate.main(["--model", str(DEFAULT), "--quick", "--out", str(tmp_path)])
    # Measured on the shipped model (stage 8, U-Net in bf16): single object 1.00, colour 1.00, overall 0.92,
    # pointing 1.00 (16 words), mIoU 0.64, CLIP-score 86.3 (stage 7: overall 0.83, mIoU 0.67, CLIP-score
    # 83.5, before layout guidance was the default; stage 6: overall 0.79, mIoU 0.64; stage 5, fp32:
    # overall 0.62, mIoU 0.66; stage 1: overall 0.58, mIoU 0.66, CLIP-score 78). The floors sit at about half
    # of that (4 images a task).
    s = report["scores"]
    assert s["single_object"]["score"] >= 0.5 and s["colour"]["score"] >= 0.5, s
    assert s["overall"]["score"] >= 0.25, s
    attention = report["attention"]
    assert attention["words"] >= 8 and attention["pointing_accuracy"] >= 0.75 and attention["miou"] >= 0.4, attention
    assert report["clip_score"] >= 60, report["clip_score"]


@pytest.mark.slow
def test_relation_guidance_orders_the_pairs_the_shipped_model_draws():
    # diffusion/layout.py: on evaluate.py's relation prompts (seed 7, 104 images) the relation held in 46
    # without guidance and 102 with it. Here 4 of those prompts × 2 images, in fp32 so any CPU agrees.
    pipe = TextToImagePipeline.from_pretrained(DEFAULT, dtype="fp32")
    prompts = [p for p in evaluate.make_prompts(4, seed=7) if p.task == "position"]
    held = {}
    for strength in (0.0, RELATION_GUIDANCE):
        held[strength] = sum(
            evaluate.correct(p, detect(im), 32)
            for i, p in enumerate(prompts)
            for im in pipe(p.text, num_images=2, steps=20, seed=1000 * i, relation_guidance=strength).images
        )
    assert held[RELATION_GUIDANCE] >= 7 and held[RELATION_GUIDANCE] > held[0.0], held


@pytest.mark.slow
def test_object_guidance_draws_both_objects_more_often():
    # diffusion/layout.py: on evaluate.py's two-object prompts of seeds 7, 3, 5 and 9 (256 images) both
    # objects were drawn in 217 without object guidance and 240 with it. Here the first 8 of seeds 5 and 9
    # × 2 images, in fp32 (26 and 30 of 32 when written).
    pipe = TextToImagePipeline.from_pretrained(DEFAULT, dtype="fp32")
    prompts = [p for seed in (5, 9) for p in evaluate.make_prompts(8, seed=seed) if p.task == "two_objects"]
    drawn = {}
    for strength in (0.0, OBJECT_GUIDANCE):
        drawn[strength] = sum(
            evaluate.correct(p, detect(im), 32)
            for i, p in enumerate(prompts)
            for im in pipe(p.text, num_images=2, steps=20, seed=1000 * (i % 8), object_guidance=strength).images
        )
    assert drawn[OBJECT_GUIDANCE] >= 28 and drawn[OBJECT_GUIDANCE] >= drawn[0.0] + 2, drawn


@pytest.mark.slow
def test_object_guidance_draws_three_objects_not_four():
    # diffusion/layout.py's count term: on evaluate.py's counting prompts of seeds 3 and 5 (128 images)
    # the count held in 115 without object guidance and 123 with it; every miss of the three-object
    # prompts was a fourth object without it. Here their "three X" prompts × 2 images, in fp32.
    pipe = TextToImagePipeline.from_pretrained(DEFAULT, dtype="fp32")
    prompts = [p for seed in (3, 5) for p in evaluate.make_prompts(16, seed=seed) if p.count == 3]
    right = {}
    for strength in (0.0, OBJECT_GUIDANCE):
        right[strength] = sum(
            evaluate.correct(p, detect(im), 32)
            for i, p in enumerate(prompts)
            for im in pipe(p.text, num_images=2, steps=20, seed=1000 * i, object_guidance=strength).images
        )
    assert right[OBJECT_GUIDANCE] >= right[0.0] + 2, right


CLIPART = DEFAULT.parent / "clipart"


@pytest.fixture(scope="module")
def clipart_pipe():
    return TextToImagePipeline.from_pretrained(CLIPART)


def test_clipart_model_reads_everyday_words_and_keeps_the_shapes_ones(clipart_pipe):
    out = clipart_pipe.text_encoder.encode(["a red apple", "a cat and a house", "a red circle above a blue square"])
    assert out.unknown_words == [[], [], []]
    assert out.tokens[1][1:-1] == ["a", "cat", "and", "a", "house"]  # whole-word tokens, not pieces
    summary = clipart_pipe.captions
    assert summary is not None and summary.grammar is None  # no shapes grammar: layout guidance stays off
    assert {"apple", "cat", "house", "tree"} <= set(summary.word_counts)


def test_clipart_model_draws_its_prompt_on_white(clipart_pipe):
    stored = load_file(CLIPART / "unet" / "model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    result = clipart_pipe("a red apple", num_images=4, steps=20, seed=0, record_attention=True)
    assert [im.size for im in result.images] == [(32, 32)] * 4  # trained at 64 px, then 32 px (its card)
    assert set(result.attention.word_maps(0)) == {"a", "red", "apple"}
    pixels = np.stack([np.asarray(im, dtype=np.float32) for im in result.images])  # (4, 32, 32, 3)
    border = np.concatenate([pixels[:, :4].reshape(-1, 3), pixels[:, -4:].reshape(-1, 3)])
    assert (border.min(axis=1) > 200).mean() > 0.5  # clip art is drawn on white, and so are its samples
    red = pixels[..., 0] - pixels[..., 1:].mean(-1)
    assert (red > 60).mean() > 0.02  # and a red thing is there
