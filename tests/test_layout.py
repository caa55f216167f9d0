"""Relation guidance (diffusion/layout.py): the noise is nudged only for prompts with a relation, only in
the first steps, downhill on the relation loss, with any sampler, and maps are still recorded."""

import numpy as np
import pytest
import torch

from diffusion.grounding import GroundingRecorder, relation_loss, relation_pairs
from diffusion.layout import RELATION_GUIDANCE, WINDOW, relation_guide
from diffusion.sampling import SAMPLERS, make_scheduler
from tests.tiny import tiny_pipeline

RELATION = "a blue square above a green triangle"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def pixels(result):
    return np.stack([np.asarray(im) for im in result.images])


def guide_for(pipe, prompt, strength, steps=20, sampler="dpm++"):
    enc = pipe.text_encoder.encode([prompt] * 2)
    scheduler = make_scheduler(pipe.scheduler_config, sampler)
    scheduler.set_timesteps(steps)
    guide = relation_guide(pipe.unet, enc, enc.context, enc.mask, None, scheduler, strength,
                           pipe.scheduler_config["num_train_timesteps"])
    return guide, enc, scheduler


def loss_at(pipe, enc, x, t):
    recorder = GroundingRecorder()
    with torch.no_grad(), pipe.unet.record_attention(recorder):
        pipe.unet(x, torch.full((x.shape[0],), int(t)), enc.context, enc.mask)
    return float(relation_loss(recorder.maps, relation_pairs(enc, enc.context.shape[1])))


def test_prompts_without_a_relation_are_untouched(pipe):
    for prompt in ("two yellow circles", "a large orange square on the left"):  # "left" is a place, not a relation
        plain = pipe(prompt, num_images=2, steps=4, seed=3)
        guided = pipe(prompt, num_images=2, steps=4, seed=3, relation_guidance=RELATION_GUIDANCE)
        assert np.array_equal(pixels(plain), pixels(guided)), prompt
        assert guide_for(pipe, prompt, RELATION_GUIDANCE)[0] is None


def test_relation_prompts_change_and_stay_reproducible(pipe):
    plain = pipe(RELATION, num_images=2, steps=4, seed=3)
    guided = pipe(RELATION, num_images=2, steps=4, seed=3, relation_guidance=RELATION_GUIDANCE)
    again = pipe(RELATION, num_images=2, steps=4, seed=3, relation_guidance=RELATION_GUIDANCE)
    assert not np.array_equal(pixels(plain), pixels(guided))
    assert np.array_equal(pixels(guided), pixels(again))
    assert guide_for(pipe, RELATION, 0.0)[0] is None  # strength 0 is off


def test_a_guide_step_goes_downhill_on_the_relation_loss(pipe):
    guide, enc, scheduler = guide_for(pipe, RELATION, 1.0)
    t = scheduler.timesteps[0]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    before = loss_at(pipe, enc, x, t)
    nudged = guide(0, t, x)
    assert not torch.equal(nudged, x) and before > 0
    assert loss_at(pipe, enc, nudged, t) < before


@pytest.mark.parametrize("steps", [5, 20, 40])
def test_only_the_noisiest_steps_are_guided_with_a_push_that_does_not_grow_with_steps(pipe, steps):
    guide, _, scheduler = guide_for(pipe, RELATION, 1.0, steps=steps)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    total = torch.zeros_like(x)
    for step, t in enumerate(scheduler.timesteps):
        nudge = x - guide(step, t, x)
        guided = int(t) >= WINDOW * pipe.scheduler_config["num_train_timesteps"]
        assert bool(nudge.abs().sum() > 0) == guided, (step, int(t))
        total += nudge
    # The same x at every step: the total push is η · (guided span / 20-step stride) · gradient, about the
    # same for any step count (the gradient differs a little between timesteps).
    reference = guide_for(pipe, RELATION, 1.0, steps=20)
    ref_total = sum(x - reference[0](s, t, x) for s, t in enumerate(reference[2].timesteps))
    ratio = float(total.norm() / ref_total.norm())
    assert 0.6 < ratio < 1.6, ratio


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_takes_relation_guidance(pipe, sampler):
    plain = pipe(RELATION, steps=6, seed=0, sampler=sampler)
    guided = pipe(RELATION, steps=6, seed=0, sampler=sampler, relation_guidance=RELATION_GUIDANCE)
    assert np.isfinite(pixels(guided)).all() and pixels(guided).std() > 0
    assert not np.array_equal(pixels(plain), pixels(guided)), sampler


def test_maps_are_recorded_at_every_step_with_guidance_on(pipe):
    plain = pipe(RELATION, num_images=2, steps=8, seed=0, record_attention=True)
    guided = pipe(RELATION, num_images=2, steps=8, seed=0, record_attention=True, relation_guidance=RELATION_GUIDANCE)
    assert guided.attention.store._counts == plain.attention.store._counts  # the guide's passes are not filed
    assert set(guided.attention.word_maps(0)) == set(plain.attention.word_maps(0))
    assert all(block.recorder is None for block in pipe.unet.attention_layers.values())


def test_bad_strength_is_refused(pipe):
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="relation_guidance must be >= 0"):
            pipe(RELATION, steps=2, relation_guidance=bad)
