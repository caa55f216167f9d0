"""The attention explorer's pictures (diffusion/render.py): word, head and layer views of a run's maps, where one
pixel looked, and the labels that say what is shown. A tiny random pipeline: 16 px samples, 2 heads."""

import numpy as np
import pytest
from PIL import Image

from diffusion.maps import COLORMAP
from diffusion.render import (
    ALL_LAYERS,
    DISPLAY,
    MEAN_HEADS,
    display_to_pixel,
    focus,
    layer_word_grid,
    map_options,
    mark,
    max_heads,
    self_attention_views,
    steps_label,
    upscale,
    word_strip,
    word_views,
)
from tests.tiny import tiny_pipeline

PROMPT = "a red circle above a blue square"
WORDS = ["a", "red", "circle", "above", "a #2", "blue", "square"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def result(pipe):
    """A run as the app records one: 2 images, 3 steps in 3 timestep bins, a negative prompt."""
    return pipe(PROMPT, negative_prompt="green triangle", num_images=2, steps=3, seed=11, sampler="ddim",
                record_attention=True, attention_bins=4)


def views(result, **choices):
    """word_views with the explorer's defaults, overridden by choices."""
    args = {"image": 1, "layer": ALL_LAYERS, "time_bin": 0, "head": MEAN_HEADS, "normalization": "minmax",
            "special_tokens": False, "negative": False, "alpha": 0.6, "word": None} | choices
    return word_views(result, **args)


def has_top_colour(image: Image.Image) -> bool:
    """Whether an alpha-1 overlay has a pixel of the colormap's brightest colour (a map's value 1)."""
    return bool((np.asarray(image) == COLORMAP[255].astype(np.uint8)).all(-1).any())


def test_upscale_keeps_every_pixel_a_square():
    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8))
    shown = upscale(small)
    assert shown.size == (DISPLAY, DISPLAY // 2)  # the longer side becomes DISPLAY
    assert np.array_equal(np.asarray(shown.resize(small.size, Image.NEAREST)), np.asarray(small))
    assert upscale(small, 32).size == (32, 16)


def test_the_explorers_choices_become_the_maps_arguments(result):
    assert map_options(ALL_LAYERS, 0, MEAN_HEADS) == {"layer": None, "bins": None, "head": None}
    assert map_options("mid.0.cross_attn", 2, 1) == {"layer": "mid.0.cross_attn", "bins": [1], "head": 1}
    assert steps_label(range(2, 3)) == "step 3" and steps_label(range(0, 5)) == "steps 1–5"
    maps = result.attention
    layers = maps.layers("cross")
    assert max_heads(maps, ALL_LAYERS) == min(maps.num_heads(n) for n in layers) == 2
    assert max_heads(maps, layers[0]) == maps.num_heads(layers[0])


def test_the_focus_stays_on_a_word_the_prompt_has_else_the_first_content_word():
    assert focus(["a", "red", "circle"], "circle") == "circle"
    assert focus(["a", "red", "circle"], "square") == "red"  # "a" is a function word
    assert focus(["a", "red", "circle"], None) == "red"
    assert focus(["<start>", "a", "the"], None) == "<start>"  # nothing but function words: the first
    assert focus([], "red") is None


def test_word_maps_follow_layer_bin_head_and_toggles(result):
    gallery, word, heads, grid, note = views(result)
    assert [c for _, c in gallery] == WORDS
    assert word == "red"  # the first content word gets the focus
    assert [c for _, c in heads] == ["head 1", "head 2"]
    layers = result.attention.layers("cross")
    assert grid.size == (150 + 100 * 7, 24 + 100 * (len(layers) + 1))  # a row per layer + all, a column per word
    assert all(im.size == (DISPLAY, DISPLAY) for im, _ in gallery + heads)
    assert note == "Image 2, prompt words · all layers · all steps · mean of heads · per word (min–max)"

    one = views(result, layer=layers[0], time_bin=3, head=1, normalization="tokens", special_tokens=True,
                alpha=0.3, word="circle")
    assert [c for _, c in one[0]][0] == "<start>" and [c for _, c in one[0]][-1] == "<end>"
    size = "×".join(map(str, result.attention.layer_size(layers[0])))
    assert one[1] == "circle" and one[4] == (f"Image 2, prompt words · {layers[0]} ({size}) · step 3 of 3 · head 2 · "
                                             "share per pixel (which word wins)")
    assert not np.array_equal(np.asarray(one[0][1][0]), np.asarray(gallery[0][0]))

    negative = views(result, image=0, normalization="absolute", negative=True, word="")
    assert [c for _, c in negative[0]] == ["green", "triangle"] and "negative prompt" in negative[4]


def test_heads_are_scaled_each_on_its_own_or_together_with_absolute(result):
    """Per word (min–max), every head's map reaches 1; absolute compares the heads, so only the strongest does."""
    each = views(result, alpha=1.0)[2]
    assert all(has_top_colour(im) for im, _ in each)
    together = views(result, alpha=1.0, normalization="absolute")[2]
    assert [has_top_colour(im) for im, _ in together].count(True) == 1


def test_a_prompt_without_words_to_show_says_what_to_do(pipe):
    res = pipe("a red circle", steps=2, seed=0, record_attention=True)
    gallery, word, heads, grid, note = views(res, image=0, negative=True)
    assert (gallery, word, heads, grid) == ([], None, [], None) and "negative prompt is empty" in note
    assert views(res, image=0, negative=True, special_tokens=True)[0]  # its start/end tokens


def test_the_grid_has_a_row_per_layer_and_the_strip_the_all_layers_row_alone(result):
    maps, sample = result.attention, result.images[0]
    common = {"negative": False, "include_special": False, "normalize": "minmax"}
    opts = map_options(ALL_LAYERS, 0, MEAN_HEADS)
    grid = layer_word_grid(maps, sample, 0, opts, common, 0.6)
    strip = word_strip(result)
    assert grid.size == (150 + 100 * 7, 24 + 100 * (len(maps.layers("cross")) + 1)) and strip.size == (850, 124)
    # The strip is the grid's first row: the same header and the same all-layers overlays.
    assert np.array_equal(np.asarray(strip), np.asarray(grid.crop((0, 0, 850, 124))))


def test_a_ring_marks_the_pixel_on_the_upscaled_picture():
    picture = Image.new("RGB", (256, 256), "black")
    ringed = np.asarray(mark(picture, (8, 5), (16, 16)))  # 16 px shown at 256: pixel (8, 5) is centred at (136, 88)
    cyan = (ringed == (0, 255, 255)).all(-1)
    ys, xs = np.nonzero(cyan)
    assert cyan.any() and not cyan[136, 88]  # around the pixel, not on it
    assert abs(ys.mean() - 136) < 1 and abs(xs.mean() - 88) < 1
    assert 8 < ys.max() - 136 < 16  # a radius of 0.7 source pixels (11 display pixels) and the ring's width
    assert np.asarray(picture).max() == 0  # a copy is drawn on


def test_self_attention_per_layer_and_pixel(result):
    target, gallery = self_attention_views(result, 0, 0, (4, 12), 0.6)
    layers = result.attention.layers("self")
    assert layers and [c for _, c in gallery][1:] == [f"{n} · 8×8" for n in layers]
    # Self-attention is recorded at chosen steps (one per bin; here 3 bins of one step): the label says which.
    assert gallery[0][1] == "all layers (mean) · steps 1, 2, 3"
    assert self_attention_views(result, 0, 2, (4, 12), 0.6)[1][0][1] == "all layers (mean) · step 2"
    assert target.size == (DISPLAY, DISPLAY)
    assert not np.array_equal(np.asarray(target), np.asarray(upscale(result.images[0])))  # the ring
    other = self_attention_views(result, 0, 0, (12, 2), 0.6)[1]
    assert not np.array_equal(np.asarray(other[1][0]), np.asarray(gallery[1][0]))


def test_a_point_on_the_picture_is_the_samples_pixel_under_it():
    assert display_to_pixel((255, 40), (16, 16)) == (2, 15)  # (x, y) on 256 px → (y, x) of 16 px
    assert display_to_pixel((0, 0), (16, 16)) == (0, 0)
    assert display_to_pixel((256, 256), (16, 16)) == (15, 15)  # the edge stays inside
    assert display_to_pixel((255, 127), (16, 32)) == (15, 31)  # a wide sample is shown 256 × 128
