"""Layout guidance (diffusion/layout.py): the noise is nudged only for prompts with a relation (relation
term), two objects or more (object term) or a number word (count term), only in the first steps,
downhill on the loss, with any sampler, and maps are still recorded."""

import numpy as np
import pytest
import torch

from diffusion.grounding import GroundingRecorder, relation_loss, relation_pairs
from diffusion.layout import (
    OBJECT_GUIDANCE,
    RELATION_GUIDANCE,
    WINDOW,
    count_loss,
    counted_phrases,
    layout_guide,
    object_loss,
    object_phrases,
    word_tokens,
)
from diffusion.sampling import SAMPLERS, make_scheduler
from tests.tiny import tiny_pipeline

RELATION = "a blue square above a green triangle"
OBJECTS = "a red circle and a blue square"
COUNTED = "three yellow circles"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def pixels(result):
    return np.stack([np.asarray(im) for im in result.images])


def guide_for(pipe, prompt, strength, steps=20, sampler="dpm++", objects=0.0):
    enc = pipe.text_encoder.encode([prompt] * 2)
    scheduler = make_scheduler(pipe.scheduler_config, sampler)
    scheduler.set_timesteps(steps)
    guide = layout_guide(pipe.unet, enc, enc.context, enc.mask, None, scheduler,
                         pipe.scheduler_config["num_train_timesteps"], relation=strength, objects=objects)
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
    assert all(block.processor.recorder is None for block in pipe.unet.attention_layers.values())


def test_bad_strength_is_refused(pipe):
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="relation_guidance must be >= 0"):
            pipe(RELATION, steps=2, relation_guidance=bad)
        with pytest.raises(ValueError, match="object_guidance must be >= 0"):
            pipe(RELATION, steps=2, object_guidance=bad)


# The object term.

def test_object_phrases_are_the_noun_phrases_of_prompts_naming_two_objects_without_a_relation(pipe):
    prompts = ["a blue square above a green triangle", "two yellow circles", "a large orange square on the left",
               "a small purple square and a red circle"]
    enc = pipe.text_encoder.encode(prompts)
    tokens, prompt = object_phrases(enc, enc.context.shape[1])
    assert prompt.tolist() == [3, 3]  # a relation is the relation term's; one phrase: no term
    for row, caption, phrase in zip(tokens, prompt.tolist(), [{"small", "purple", "square"}, {"red", "circle"}],
                                    strict=True):
        named = {enc.words[caption][enc.word_ids[caption][i]] for i in row.nonzero()[:, 0].tolist()}
        assert named == phrase


def test_object_loss_is_one_minus_the_weakest_phrase_peak():
    # One caption of 5 tokens: start, "red", "circle", "blue", "square", over 4 positions; end token left out.
    words = torch.tensor([[0.0, 1, 1, 1, 1]])
    tokens = torch.tensor([[0.0, 1, 1, 0, 0], [0.0, 0, 0, 1, 1]])
    phrases = (tokens, torch.tensor([0, 0]))
    a = torch.zeros(1, 5, 4)
    a[0, 0] = 0.5  # the start token's attention does not count
    a[0, 1:3, :] = 0.25  # "red circle" holds the words' attention everywhere ...
    a[0, 3, 0] = 0.25  # ... but at position 0, where "blue" has as much as "red" and "circle" together
    shares = object_loss([((2, 2), a)], phrases, words)
    assert torch.isclose(shares, torch.tensor(1 - 0.25 / 0.75))
    # The finest layers only; a caption with no phrases adds nothing.
    coarse = torch.zeros(1, 5, 1)
    coarse[0, 3:] = 1
    assert torch.isclose(object_loss([((2, 2), a), ((1, 1), coarse)], phrases, words), shares)
    assert float(object_loss([((2, 2), a)], (torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)), words)) == 0


def test_object_guidance_changes_two_object_and_counted_prompts_only(pipe):
    for prompt in ("a yellow circle", "a large orange square on the left", RELATION, "two circles above a square"):
        plain = pipe(prompt, num_images=2, steps=4, seed=3)
        guided = pipe(prompt, num_images=2, steps=4, seed=3, object_guidance=OBJECT_GUIDANCE)
        assert np.array_equal(pixels(plain), pixels(guided)) and not guided.object_guided, prompt
    plain = pipe(OBJECTS, num_images=2, steps=4, seed=3)
    guided = pipe(OBJECTS, num_images=2, steps=4, seed=3, object_guidance=OBJECT_GUIDANCE)
    again = pipe(OBJECTS, num_images=2, steps=4, seed=3, object_guidance=OBJECT_GUIDANCE)
    assert not np.array_equal(pixels(plain), pixels(guided)) and np.array_equal(pixels(guided), pixels(again))
    assert guided.object_guided and not guided.relation_guided
    counted = pipe(COUNTED, num_images=2, steps=4, seed=3, object_guidance=OBJECT_GUIDANCE)
    assert counted.object_guided and not np.array_equal(pixels(counted), pixels(pipe(COUNTED, num_images=2, steps=4,
                                                                                       seed=3)))
    # A batch of both kinds: each prompt gets its own term, in one pass.
    both = pipe([OBJECTS, RELATION], num_images=1, steps=4, seed=3, object_guidance=OBJECT_GUIDANCE,
                relation_guidance=RELATION_GUIDANCE)
    alone = [pipe(OBJECTS, steps=4, seed=3, object_guidance=OBJECT_GUIDANCE),
             pipe(RELATION, steps=4, seed=4, relation_guidance=RELATION_GUIDANCE)]
    assert both.object_guided and both.relation_guided
    for image, single in zip(both.images, alone, strict=True):
        np.testing.assert_allclose(np.asarray(image, dtype=float), pixels(single)[0], atol=2)


def test_a_guide_step_goes_downhill_on_the_object_loss(pipe):
    guide, enc, scheduler = guide_for(pipe, OBJECTS, 0.0, objects=1.0)
    assert guide.objects and not guide.relations
    t = scheduler.timesteps[0]
    phrases, words = object_phrases(enc, enc.context.shape[1]), word_tokens(enc, enc.context.shape[1])

    def loss(x):
        recorder = GroundingRecorder()
        with torch.no_grad(), pipe.unet.record_attention(recorder):
            pipe.unet(x, torch.full((x.shape[0],), int(t)), enc.context, enc.mask)
        return float(object_loss(recorder.maps, phrases, words))

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = loss(x)
    nudged = guide(0, t, x)
    assert before > 0 and loss(nudged) < before


# The count term.

def test_counted_phrases_are_those_with_a_number_word_in_prompts_without_a_relation(pipe):
    prompts = ["two yellow circles", "a red circle", "a red circle and three small blue squares",
               "two circles above a square", "a red circle and a blue square"]
    enc = pipe.text_encoder.encode(prompts)
    tokens, prompt, count = counted_phrases(enc, enc.context.shape[1])
    assert prompt.tolist() == [0, 2] and count.tolist() == [2, 3]
    for row, caption, phrase in zip(tokens, prompt.tolist(), [{"yellow", "circles"}, {"small", "blue", "squares"}],
                                    strict=True):
        assert {enc.words[caption][enc.word_ids[caption][i]] for i in row.nonzero()[:, 0].tolist()} == phrase


def test_count_loss_is_the_attention_beyond_the_n_strongest_grid_cells():
    # One caption, tokens: start, "two", "circles"; the phrase is "circles". A 6×6 map: 2×2 positions a cell.
    tokens, prompt = torch.tensor([[0.0, 0, 1]]), torch.tensor([0])
    a = torch.zeros(1, 3, 6, 6)
    a[0, 0] = 0.9  # the start token's attention is not the phrase's
    a[0, 2, 0:2, 0:2] = 0.6  # cell (0, 0)
    a[0, 2, 4:6, 4:6] = 0.6  # cell (2, 2)
    maps = [((6, 6), a.flatten(2))]
    assert float(count_loss(maps, (tokens, prompt, torch.tensor([2])))) == pytest.approx(0.0)
    a[0, 2, 0:2, 4:6] = 0.3  # a third, weaker blob: cell (0, 2)
    maps = [((6, 6), a.flatten(2)), ((3, 3), torch.ones(1, 3, 9))]  # the finest layers only
    assert float(count_loss(maps, (tokens, prompt, torch.tensor([2])))) == pytest.approx(0.3 / 1.5)
    assert float(count_loss(maps, (tokens, prompt, torch.tensor([3])))) == pytest.approx(0.0)
    none = (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert float(count_loss(maps, none)) == 0


def test_a_guide_step_goes_downhill_on_the_count_loss(pipe):
    guide, enc, scheduler = guide_for(pipe, COUNTED, 0.0, objects=1.0)
    assert guide.objects and guide.counts and not guide.relations
    t = scheduler.timesteps[0]
    counted = counted_phrases(enc, enc.context.shape[1])

    def loss(x):
        recorder = GroundingRecorder()
        with torch.no_grad(), pipe.unet.record_attention(recorder):
            pipe.unet(x, torch.full((x.shape[0],), int(t)), enc.context, enc.mask)
        return float(count_loss(recorder.maps, counted))

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = loss(x)
    assert before > 0 and loss(guide(0, t, x)) < before
