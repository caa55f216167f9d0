"""Compare side by side: the same seeds on two models or two prompts, their word maps aligned word by word
(diffusion/render.py's align_words, compared_maps, comparison_view) and the app's Compare tab and `compare`
endpoint (app.py). Tiny random pipelines: 16 px samples, 2 steps."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr
import numpy as np
import pytest
import torch

import app
from diffusion.render import (
    Comparison,
    align_words,
    common_size,
    compared_maps,
    comparison_view,
    diverging,
    map_differences,
    word_text,
)
from tests.tiny import OWN_CAPTIONS, tiny_pipeline

# Unknown words of the other model (gr.Warning outside a request); Gradio 6.31's queue calls a pandas option that
# pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::pandas.errors.Pandas4Warning")


@pytest.fixture(scope="module")
def pipes():
    return tiny_pipeline(), tiny_pipeline(OWN_CAPTIONS, grammar=None)


def run(pipe, prompt, **kwargs):
    return pipe(prompt, num_images=2, steps=2, seed=5, sampler="ddim", record_attention=True, attention_bins=2,
                **kwargs)


# -- aligning words -------------------------------------------------------------------------------
def test_one_changed_word_gets_a_column_on_each_side():
    assert align_words(["a", "red", "circle"], ["a", "blue", "circle"]) == [
        ("a", "a"), ("red", None), (None, "blue"), ("circle", "circle")]


def test_identical_prompts_share_every_column():
    words = ["a", "red", "circle", "above", "a #2", "blue", "square"]
    assert align_words(words, words) == [(w, w) for w in words]


def test_repeated_words_align_by_their_text_in_order():
    a = ["a", "red", "circle", "and", "a #2", "red #2", "square"]
    assert align_words(a, ["a", "red", "circle"]) == [("a", "a"), ("red", "red"), ("circle", "circle"),
                                                      ("and", None), ("a #2", None), ("red #2", None),
                                                      ("square", None)]
    # "a #2" of one prompt meets "a" of the other when that is how the words line up
    assert align_words(["two", "circles", "and", "a", "square"], ["a", "square"]) == [
        ("two", None), ("circles", None), ("and", None), ("a", "a"), ("square", "square")]
    assert align_words(["a", "circle", "a #2", "square"], ["a", "square"]) == [
        ("a", "a"), ("circle", None), ("a #2", None), ("square", "square")]
    assert word_text("a #2") == "a" and word_text("#2") == "#2"


def test_words_of_one_prompt_alone_and_no_words():
    assert align_words(["red"], ["blue"]) == [("red", None), (None, "blue")]
    assert align_words([], ["blue"]) == [(None, "blue")] and align_words([], []) == []


# -- maps and differences -------------------------------------------------------------------------
def test_the_difference_is_zero_for_identical_maps_and_antisymmetric(pipes):
    red, blue = run(pipes[0], "a red circle"), run(pipes[0], "a blue circle")
    columns, maps_a, maps_b, _ = compared_maps(red.attention, red.attention, 1, "absolute")
    same = map_differences(columns, maps_a, maps_b)
    assert len(same) == 3 and all(torch.equal(d, torch.zeros_like(d)) for d in same.values())

    ab = map_differences(*compared_maps(red.attention, blue.attention, 0, "absolute")[:3])
    ba = map_differences(*compared_maps(blue.attention, red.attention, 0, "absolute")[:3])
    assert set(ab) == {("a", "a"), ("circle", "circle")} and set(ba) == set(ab)
    for key, d in ab.items():
        assert torch.allclose(d, -ba[key]) and d.abs().max() > 0


def test_absolute_puts_both_rows_on_one_scale(pipes):
    a, b = run(pipes[0], "a red circle").attention, run(pipes[1], "a red apple").attention
    columns, maps_a, maps_b, size = compared_maps(a, b, 0, "absolute")
    peak = max(m.max().item() for m in [*maps_a.values(), *maps_b.values()])
    assert peak == pytest.approx(1.0) and size == (16, 16)
    raw_a, raw_b = a.word_maps(0, normalize=None), b.word_maps(0, normalize=None)
    top = max(m.max() for m in [*raw_a.values(), *raw_b.values()])
    assert torch.allclose(maps_a["red"], raw_a["red"] / top) and torch.allclose(maps_b["red"], raw_b["red"] / top)
    _, minmax_a, _, _ = compared_maps(a, b, 0, "minmax")  # per word: each map spans 0…1 on its own
    assert all(m.min() == pytest.approx(0) and m.max() == pytest.approx(1) for m in minmax_a.values())
    _, tokens_a, _, _ = compared_maps(a, b, 0, "tokens")  # shares of each run's own words
    assert torch.allclose(torch.stack(list(tokens_a.values())).sum(0), torch.ones(16, 16))


def test_maps_of_different_sizes_are_compared_at_the_larger_and_it_is_said(pipes):
    small, large = run(pipes[0], "a red circle"), run(pipes[0], "a red circle", height=32, width=32)
    assert common_size(small.attention.image_size, large.attention.image_size) == (32, 32)
    columns, maps_a, maps_b, size = compared_maps(small.attention, large.attention, 0, "absolute")
    assert size == (32, 32) and all(m.shape == (32, 32) for m in [*maps_a.values(), *maps_b.values()])
    _, note = comparison_view(Comparison(small, large, "16 px", "32 px"), 0, "absolute")
    assert "A's maps are 16×16 and B's 32×32: both resized to 32×32" in note


def test_the_diverging_colormap_is_white_at_zero_red_for_a_blue_for_b():
    d = torch.tensor([[-1.0, 0.0, 1.0]])
    colours = np.asarray(diverging(d, 1.0, size=3))[0]
    assert colours[1].min() > 240  # white-ish
    assert colours[2][0] > colours[2][2] and colours[0][2] > colours[0][0]  # red: A more; blue: B more


def test_the_comparison_view_draws_rows_a_b_and_the_difference_and_says_what_moved(pipes):
    red, blue = run(pipes[0], "a red circle"), run(pipes[0], "a blue circle")
    grid, note = comparison_view(Comparison(red, blue, '"a red circle"', '"a blue circle"'), 1, "absolute")
    assert grid.width >= 150 + 4 * 100 and grid.height > 3 * 100  # 4 columns (a, red, blue, circle), 3 rows
    assert note.startswith("Image 2 · seed 6 ·") and "only in A: red · only in B: blue" in note
    assert "Moved most" in note and "**a**" in note and "**circle**" in note
    _, same = comparison_view(Comparison(red, red, "x", "y"), 0, "minmax")
    assert 'prompt "a red circle" on both sides' in same and "full colour = ±0" in same
    with pytest.raises(ValueError, match="image must be from 0 to 1"):
        comparison_view(Comparison(red, blue, "a", "b"), 2, "absolute")


# -- the app --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(pipes, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        blocks = app.build_demo({"a": pipes[0], "b": pipes[1]})
        yield blocks
        blocks.close()


def handler(demo, api_name):
    return next(fn.fn for fn in demo.fns.values() if fn.api_name == api_name)


def compare_args(**overrides):
    args = {"prompt": "a red circle", "prompt_b": "", "model_a": "a", "model_b": "b", "steps": 2, "guidance": 4.0,
            "seed": 3, "sampler": "ddim", "num_images": 2, "normalization": "absolute"}
    return {**args, **overrides}


def test_compare_returns_two_rows_of_samples_with_the_same_seeds_and_a_grid(demo):
    samples_a, samples_b, grid, note, comparison = handler(demo, "compare")(**compare_args())
    assert [c for _, c in samples_a] == ["A · seed 3", "A · seed 4"] and [c for _, c in samples_b] == [
        "B · seed 3", "B · seed 4"]
    assert samples_a[0][0].size == (256, 256) and grid.width > 150 and "A: a · B: b" in note
    assert comparison.a.prompts == comparison.b.prompts == ["a red circle"] * 2  # "" is A's prompt
    assert not np.array_equal(np.asarray(comparison.a.images[0]), np.asarray(comparison.b.images[0]))

    # Another image and normalisation of the same comparison; the selector offers its images.
    grid2, note2 = app.render_comparison(comparison, 1, "minmax")
    assert note2.startswith("Image 2 · seed 4") and grid2.size == grid.size
    assert app.comparison_images(comparison)["choices"] == [("image 1 · seed 3", 0), ("image 2 · seed 4", 1)]


def test_two_prompts_on_one_model_change_one_word(demo):
    *_, note, comparison = handler(demo, "compare")(**compare_args(prompt_b="a blue circle", model_b="a"))
    assert 'A: "a red circle" · B: "a blue circle"' in note and "only in B: blue" in note
    # the same model and seeds: only the word differs
    assert comparison.a.seeds == comparison.b.seeds


@pytest.mark.parametrize("bad, message", [
    ({"model_a": "nope"}, "model_a: model must be one of 'a', 'b'; got 'nope'"),
    ({"model_b": 3}, "model_b: model must be one of 'a', 'b'; got 3"),
    ({"prompt": "  "}, "prompt is empty"),
    ({"prompt_b": "x" * 301}, "prompt_b has 301 characters; the limit is 300"),
    ({"prompt_b": "a (red:11) circle"}, "prompt_b: emphasis weight 11.0"),
    ({"steps": 0}, "steps must be a whole number from 1 to 100"),
    ({"normalization": "z"}, "normalization must be one of 'minmax', 'absolute', 'tokens'"),
])
def test_bad_compare_requests_get_the_validation_layers_error(demo, bad, message):
    with pytest.raises(gr.Error, match=message):
        handler(demo, "compare")(**compare_args(**bad))


def test_rerendering_needs_a_comparison_and_an_image_it_made(demo):
    with pytest.raises(gr.Error, match="No comparison in this session: press Compare first"):
        app.render_comparison(None, 0, "absolute")
    *_, comparison = handler(demo, "compare")(**compare_args(num_images=1))
    with pytest.raises(gr.Error, match="compare_image must be a whole number from 0 to 7"):
        app.render_comparison(comparison, 8, "absolute")
    with pytest.raises(gr.Error, match="image must be from 0 to 0"):
        app.render_comparison(comparison, 1, "absolute")
    with pytest.raises(gr.Error, match="normalization must be one of"):
        app.render_comparison(comparison, 0, "none")


def test_models_added_after_the_app_was_built_can_be_compared(pipes):
    import inspect

    demo = app.build_demo({"a": pipes[0]})
    try:
        refresh = next(fn.fn for fn in demo.fns.values() if fn.name == "refresh_models")
        # build_demo's own models dict, which a finished fine-tune adds to (add_model)
        models = inspect.getclosurevars(inspect.getclosurevars(refresh).nonlocals["model_names"]).nonlocals["models"]
        models["late"] = pipes[1]
        updates = refresh("a", "late")
        assert [u["choices"] for u in updates] == [["a", "late"]] * 2 and updates[1]["value"] == "late"
        *_, note, comparison = handler(demo, "compare")(**compare_args(model_b="late"))
        assert "A: a · B: late" in note and comparison.b.attention is not None
    finally:
        demo.close()


def test_the_compare_endpoint_is_documented_with_its_limits(demo):
    doc = handler(demo, "compare").__doc__
    assert "prompt_b: side B's prompt" in doc and "text of at most 300 characters." in doc
    assert "model_b: which of the served models draws side B; one of 'a', 'b'." in doc
    api = demo.get_api_info()["named_endpoints"]["/compare"]
    assert [p["parameter_name"] for p in api["parameters"]] == list(compare_args())


def test_the_browser_checks_the_compare_form_first():
    app.check_compare(**compare_args())  # the valid form passes
    with pytest.raises(gr.Error, match="prompt_b has 301 characters"):
        app.check_compare(**compare_args(prompt_b="x" * 301))
    with pytest.raises(gr.Error, match="num_images must be a whole number from 1 to 8"):
        app.check_compare(**compare_args(num_images=0))


def test_compare_through_gradio_client(demo):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from tests.serving import free_port

    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        client = Client(url, verbose=False)
        samples_a, samples_b, grid, note = client.predict(**compare_args(prompt_b="a blue circle"), api_name="/compare")
        assert len(samples_a) == len(samples_b) == 2 and samples_a[0]["caption"] == "A · seed 3"
        assert os.path.exists(grid) and "only in A: red · only in B: blue" in note
        with pytest.raises(AppError, match="model_b: model must be one of 'a', 'b'"):
            client.predict(**compare_args(model_b="c"), api_name="/compare")
    finally:
        demo.close()
