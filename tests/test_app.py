"""The Gradio app: its functions in-process, then a live server driven by gradio_client.

A tiny random pipeline (16 px noise images) and 2–3 sampling steps keep every test fast; what is
tested is the wiring: limits, seeds, the maps that come back, errors that leave the server up.
"""

import functools
import os
import threading
import zipfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

import app
from diffusion import vocabulary
from diffusion.pipeline import TextToImagePipeline
from diffusion.render import ALL_LAYERS, MEAN_HEADS
from tests.serving import free_port
from tests.tiny import OWN_CAPTIONS, tiny_pipeline

PROMPT = "a red circle above a blue square"
# Gradio 6.31's queue calls a pandas option that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


class NoProgress:
    """Stands in for gr.Progress outside a request."""

    def __call__(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def result(pipe):
    """One generation shared by the explorer tests: 2 images, 3 steps, a negative prompt."""
    _, seed, status, res = app.generate(pipe, PROMPT, "green triangle", 3, 4.0, 11, False, "ddim", 2,
                                        progress=NoProgress())
    assert seed == 11 and res.attention is not None
    return res


def form(**overrides):
    """Arguments of the generate form (check_generate), valid unless overridden."""
    args = {"prompt": "a red circle", "negative_prompt": "", "steps": 20, "guidance": 4.0, "seed": 0,
            "randomize_seed": False, "sampler": "dpm++", "num_images": 4, "relation_guidance": 50.0,
            "object_guidance": 20.0}
    return {**args, **overrides}


# -- in-process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"prompt": "x" * 301}, "prompt has 301 characters; the limit is 300"),
    ({"negative_prompt": "x" * 301}, "negative_prompt has 301 characters"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": None}, "prompt must be non-empty text of at most 300 characters; got nothing"),
    ({"steps": 0}, "steps must be a whole number from 1 to 100; got 0"),
    ({"steps": 101}, "steps must be a whole number from 1 to 100"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"steps": "NaN"}, "steps must be a whole number from 1 to 100; got 'NaN' \\(text\\)"),
    ({"steps": True}, "steps must be a whole number from 1 to 100; got True \\(a boolean\\)"),
    ({"num_images": 9}, "num_images must be a whole number from 1 to 8"),
    ({"num_images": [1, 2]}, "num_images must be a whole number from 1 to 8; got \\[1, 2\\] \\(a list\\)"),
    ({"guidance": 20.5}, "guidance must be a number from 0 to 20"),
    ({"guidance": float("inf")}, "guidance must be a number from 0 to 20; got inf"),
    ({"seed": -1}, "seed must be a whole number from 0 to 2147483647"),
    ({"seed": 2**31}, "seed must be a whole number from 0 to 2147483647"),
    ({"randomize_seed": "yes"}, "randomize_seed must be true or false"),
    ({"sampler": "plms"}, "sampler must be one of 'ddim', 'ddpm', 'dpm\\+\\+', 'euler'; got 'plms'"),
    ({"relation_guidance": -5}, "relation_guidance must be a number from 0 to 200 \\(0 turns it off\\)"),
    ({"relation_guidance": 250}, "relation_guidance must be a number from 0 to 200"),
    ({"object_guidance": -1}, "object_guidance must be a number from 0 to 100 \\(0 turns it off\\)"),
    ({"object_guidance": float("nan")}, "object_guidance must be a number from 0 to 100"),
])
def test_limits_raise_errors_that_name_the_parameter_and_the_limit(bad, message):
    app.check_generate(**form())  # the valid form passes
    with pytest.raises(gr.Error, match=message):
        app.check_generate(**form(**bad))


def test_the_pipeline_and_the_app_share_one_step_limit(pipe):
    from diffusion import limits, pipeline

    assert pipeline.MAX_STEPS is limits.MAX_STEPS and app.MAX_STEPS is limits.MAX_STEPS
    with pytest.raises(ValueError, match=f"steps must be between 1 and {limits.MAX_STEPS}"):
        pipe("a red circle", steps=limits.MAX_STEPS + 1)


def test_a_handler_parameter_without_a_check_is_refused_when_the_app_is_built():
    def handler(prompt: str, colour: str) -> None:
        pass

    with pytest.raises(TypeError, match=r"handler has parameters without a check: \['colour'\]"):
        app.validated(handler)


def test_every_event_of_the_app_takes_raw_inputs(pipe):
    """Gradio's preprocessing raised unexplained errors on bad API values: no event of the app's may use it, so
    every value reaches the validation layer as sent (tests/test_app_fuzz.py holds every endpoint to it).
    gr.Examples' own event is Gradio's, private, and sends an example's index."""
    demo = app.build_demo(pipe)
    try:
        ours = [fn for fn in demo.fns.values() if fn.fn is not None and fn.fn.__module__ == "app"]
        assert len(ours) > 10 and [fn.name for fn in ours if fn.preprocess] == []
    finally:
        demo.close()


def test_an_unexpected_failure_is_answered_as_a_bug_not_an_unexplained_error():
    @app.validated
    def broken(prompt: str) -> None:
        raise KeyError("oops")

    with pytest.raises(gr.Error, match=r"broken failed \(KeyError: 'oops'\)\. This is a bug in the app"):
        broken("a red circle")


def test_generate_refuses_out_of_range_requests_before_sampling(pipe):
    with pytest.raises(gr.Error, match="prompt has 301 characters; the limit is 300"):
        app.generate(pipe, "x" * 301, "", 2, 4.0, 0, False, "ddim", 1, progress=NoProgress())
    with pytest.raises(gr.Error, match="prompt: emphasis weight 11.0 in '\\(red:11\\)' is outside 0..10"):
        app.generate(pipe, "a (red:11) circle", "", 2, 4.0, 0, False, "ddim", 1, progress=NoProgress())


def test_generate_is_seeded_upscaled_and_records_maps(pipe):
    seen = []

    def progress(value, desc=None, unit=None):
        seen.append(value)

    gallery, seed, status, res = app.generate(pipe, "a red circle", "", 3, 4.0, 7.0, False, "ddim", 2,
                                              progress=progress)
    assert seed == 7 and res.seeds == [7, 8] and "Seed 7" in status
    assert [caption for _, caption in gallery] == ["seed 7", "seed 8"]
    assert app.explorer_choices(res)[0]["columns"] == 2  # 2 images side by side, 8 in 4 columns
    assert (3, 3) not in seen and (2, 3) in seen  # the bar follows the steps: called before each one
    again = app.generate(pipe, "a red circle", "", 3, 4.0, 7, False, "ddim", 2, progress=NoProgress())[3]
    for a, b in zip(res.images, again.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    shown = gallery[0][0]
    assert shown.size == (256, 256)  # 16 px samples shown at 256 px, nearest: the pixels stay exact
    assert np.array_equal(np.asarray(shown.resize((16, 16), Image.NEAREST)), np.asarray(res.images[0]))


def test_relation_guidance_is_on_by_default_and_said_in_the_status(pipe):
    run = functools.partial(app.generate, pipe, negative_prompt="", steps=3, guidance=4.0, seed=2,
                            randomize_seed=False, sampler="ddim", num_images=1, progress=NoProgress())
    _, _, status, guided = run(prompt=PROMPT)
    assert guided.relation_guided and f"relation guidance {app.RELATION_GUIDANCE:g}" in status
    _, _, status, off = run(prompt=PROMPT, relation_guidance=0)
    assert not off.relation_guided and "relation guidance" not in status
    assert not np.array_equal(np.asarray(guided.images[0]), np.asarray(off.images[0]))
    _, _, status, plain = run(prompt="a red circle")  # nothing to guide: not said
    assert not plain.relation_guided and "relation guidance" not in status


def test_object_guidance_is_on_by_default_and_said_in_the_status(pipe):
    run = functools.partial(app.generate, pipe, negative_prompt="", steps=3, guidance=4.0, seed=2,
                            randomize_seed=False, sampler="ddim", num_images=1, progress=NoProgress())
    _, _, status, guided = run(prompt="a red circle and a blue square")  # two objects: the object term applies
    assert guided.object_guided and f"object guidance {app.OBJECT_GUIDANCE:g}" in status
    assert "relation guidance" not in status
    _, _, status, off = run(prompt="a red circle and a blue square", object_guidance=0)
    assert not off.object_guided and "object guidance" not in status
    assert not np.array_equal(np.asarray(guided.images[0]), np.asarray(off.images[0]))
    _, _, status, counted = run(prompt="two red circles")  # a number word: the count term applies
    assert counted.object_guided and f"object guidance {app.OBJECT_GUIDANCE:g}" in status
    _, _, status, plain = run(prompt="a red circle")  # one object: not touched, not said
    assert not plain.object_guided and "object guidance" not in status


def test_randomized_seed_is_reported_and_in_range(pipe):
    _, seed, status, res = app.generate(pipe, "a red circle", "", 1, 4.0, 0, True, "ddim", 1, progress=NoProgress())
    assert res.seed == seed and 0 <= seed <= app.MAX_SEED - app.MAX_IMAGES and f"Seed {seed}" in status


def test_unknown_words_are_listed(pipe):
    with pytest.warns(UserWarning, match="unknown words: zebra, okapi"):  # gr.Warning, outside a request
        _, _, status, _ = app.generate(pipe, "a red zebra circle okapi", "", 1, 4.0, 0, False, "ddim", 1,
                                       progress=NoProgress())
    assert "unknown words: zebra, okapi" in status and "red" not in status.split("unknown")[1]


def examples_of(pipe) -> list[str]:
    """The prompts of the app's Examples for a model (none when it shows no Examples)."""
    demo = app.build_demo(pipe)
    try:
        return [row[0] for block in demo.blocks.values() if isinstance(block, gr.Dataset) for row in block.samples]
    finally:
        demo.close()


def test_a_model_of_its_own_words_gets_its_examples_words_and_no_shapes_guidance():
    own = tiny_pipeline(OWN_CAPTIONS, grammar=None)  # "a polar bear on the ice": a person's own captions
    examples = examples_of(own)
    assert examples and set(examples) <= set(OWN_CAPTIONS) and examples[0] == OWN_CAPTIONS[0]
    _, _, status, res = app.generate(own, "a red apple above a polar bear", "", 2, 4.0, 0, False, "ddim", 1,
                                     progress=NoProgress())
    assert not (res.relation_guided or res.object_guided) and "relation guidance" not in status
    assert "\n\nLayout guidance is off: this model's captions are not in the shapes grammar" in status
    with pytest.warns(UserWarning, match="unknown words: circle"):  # its own captions decide, not the shapes words
        status = app.generate(own, "a red circle", "", 1, 4.0, 0, False, "ddim", 1, progress=NoProgress())[2]
    assert "unknown words: circle" in status


def test_a_model_without_a_caption_summary_says_so_and_shows_no_shapes_examples():
    own = tiny_pipeline(OWN_CAPTIONS, grammar=None)
    bare = TextToImagePipeline(own.unet, own.text_encoder, own.scheduler_config)
    assert examples_of(bare) == []


def test_the_shapes_model_keeps_its_guidance_and_shows_its_captions(pipe):
    assert set(examples_of(pipe)) <= set(pipe.captions.examples)
    _, _, status, res = app.generate(pipe, "blue square on the left, red circle on the right", "", 2, 4.0, 0, False,
                                     "ddim", 1, progress=NoProgress())
    assert res.relation_guided and f"relation guidance {app.RELATION_GUIDANCE:g}" in status
    _, _, status, res = app.generate(pipe, "a blue square next to a red circle", "", 2, 4.0, 0, False, "ddim", 1,
                                     progress=NoProgress())
    assert not res.relation_guided and "'next to' is not a relation this model's guidance understands" in status


def test_the_attention_endpoint_shows_the_views_of_its_choices(result):
    gallery, word, heads, grid, note = app.render_attention(result, 1, ALL_LAYERS, 0, MEAN_HEADS, "minmax", False,
                                                            False, 0.6, None)
    assert [c for _, c in gallery] == ["a", "red", "circle", "above", "a #2", "blue", "square"] and word == "red"
    assert [c for _, c in heads] == ["head 1", "head 2"] and grid.width > 256
    assert note == "Image 2, prompt words · all layers · all steps · mean of heads · per word (min–max)"


def test_word_selector_follows_image_negative_and_special_toggles(result):
    assert app.word_choices(result, 0, False, False, "circle") == {
        "__type__": "update", "choices": ["a", "red", "circle", "above", "a #2", "blue", "square"], "value": "circle"}
    negative = app.word_choices(result, 0, True, True, "circle")  # "circle" is gone: the first content word
    assert negative["choices"] == ["<start>", "green", "triangle", "<end>"] and negative["value"] == "green"


def test_explorer_rejects_bad_choices_with_the_bounds_of_the_sessions_run(result):
    args = [result, 0, ALL_LAYERS, 0, MEAN_HEADS, "minmax", False, False, 0.6, None]
    for index, bad, message in [
        (1, 2, r"image must be a whole number from 0 to 1 \(0 is the first image\); got 2"),  # 2 images
        (2, "down.9.cross_attn", "layer must be one of 'all', 'down.1.0.cross_attn'"),
        (3, 4, r"time_bin must be a whole number from 0 to 3 \(0: all steps\)"),  # 3 steps: 3 bins
        (4, 2, r"head must be a whole number from -1 to 1 \(-1: the mean of heads\)"),
        (5, "max", "normalization must be one of 'minmax', 'absolute', 'tokens'; got 'max'"),
        (8, 1.5, "alpha must be a number from 0 to 1; got 1.5"),
        (9, "x" * 101, "word has 101 characters; the limit is 100"),
    ]:
        with pytest.raises(gr.Error, match=message):
            app.render_attention(*args[:index], bad, *args[index + 1:])
    with pytest.raises(gr.Error, match="generate images first"):
        app.render_attention(None, *args[1:])


def test_self_attention_endpoint_and_pixel_clicks(result):
    target, gallery = app.render_self_attention(result, 0, 0, 4, 12, 0.6)
    assert target.size == (256, 256) and gallery[0][1] == "all layers (mean) · steps 1, 2, 3"
    with pytest.raises(gr.Error, match=r"pixel_y must be a whole number from 0 to 15 \(a row of the 16-pixel"):
        app.render_self_attention(result, 0, 0, 16, 0, 0.6)
    click = gr.SelectData(None, {"index": [255, 40], "value": None})  # (x, y) on the 256 px display
    assert app.click_pixel(result, 0, click) == (2, 15)


def test_main_without_a_model_says_how_to_get_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(tmp_path / "missing")])
    assert "--model" in str(exit_info.value) and "train.py" in str(exit_info.value)
    (tmp_path / "partial" / "text_encoder").mkdir(parents=True)  # e.g. weights/default before its U-Net ships
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(tmp_path / "partial")])
    assert "no unet/" in str(exit_info.value) and "train.py" in str(exit_info.value)


def test_the_selector_names_models_by_folder_and_finds_the_shipped_ones(tmp_path):
    for name in ("zoo", "default", "clipart", "notes"):
        (tmp_path / "weights" / name / ("unet" if name != "notes" else "x")).mkdir(parents=True)
    found = app.shipped_models(tmp_path / "weights")
    assert found == [str(tmp_path / "weights" / n) for n in ("default", "clipart", "zoo")]  # default first
    assert app.shipped_models(tmp_path / "nothing") == [app.DEFAULT_MODEL]
    (tmp_path / "runs" / "f100" / "pipeline").mkdir(parents=True)
    assert list(app.model_names([str(tmp_path / "weights" / "clipart"), str(tmp_path / "runs" / "f100" / "pipeline"),
                                 "owner/name"])) == ["clipart", "f100", "owner/name"]
    twins = [str(tmp_path / "weights" / "default"), str(tmp_path / "runs" / "f100" / "pipeline")]
    (tmp_path / "runs" / "default").mkdir()
    twins.append(str(tmp_path / "runs" / "default"))
    assert list(app.model_names(twins)) == [twins[0], "f100", twins[2]]  # two "default"s: as given


def test_two_models_each_show_their_own_examples_words_and_card(pipe):
    own = tiny_pipeline(OWN_CAPTIONS, grammar=None)
    demo = app.build_demo({"shapes": pipe, "own": own})
    try:
        datasets = [block.samples for block in demo.blocks.values() if isinstance(block, gr.Dataset)]
        assert len(datasets) == 1 and {row[0] for row in datasets[0]} <= set(pipe.captions.examples)
        shown = [block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
        assert vocabulary.knows_note(pipe.captions, pipe.whole_words, pipe.layout_grammar) in shown
        assert shown.count(vocabulary.model_card_text(None)) == 1  # the first model's card
        selector = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model")
        assert selector.visible and [c[1] for c in selector.choices] == ["shapes", "own"]
        select = next(fn for fn in demo.fns.values() if fn.name == "select_model").fn
        updates = select("own")  # examples, the no-examples note, words, card, then the prompt and guidance
        assert {row[0] for row in updates[0]["samples"]} <= set(OWN_CAPTIONS) and updates[0]["visible"]
        assert updates[1]["visible"] is False
        assert updates[2] == vocabulary.knows_note(own.captions, own.whole_words, own.layout_grammar)
        assert updates[3] == vocabulary.model_card_text(None)
        assert "polar bear" in updates[4]["placeholder"] and "not in the shapes grammar" in updates[5]["info"]
        assert "not in the shapes grammar" not in select("shapes")[5]["info"]
        assert updates[7] == vocabulary.WORDS_NOTE and select("shapes")[7] == vocabulary.GROUNDED_WORDS_NOTE
        with pytest.raises(gr.Error, match="model must be one of 'shapes', 'own'; got 'cat'"):
            select("cat")
        use = next(fn for fn in demo.fns.values() if fn.name == "use_example").fn
        assert use("own", 0) == updates[0]["samples"][0][0]  # a click sends the example's index
        with pytest.raises(gr.Error, match="example must be a whole number"):
            use("own", 999)
    finally:
        demo.close()
    one = app.build_demo(pipe)  # one model: no selector to show
    try:
        assert not next(b for b in one.blocks.values() if getattr(b, "elem_id", None) == "model").visible
    finally:
        one.close()


# -- a live server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        demo = app.build_demo(pipe)
        try:
            _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                    quiet=True)
            yield url
        finally:
            demo.close()


def test_live_generate_then_maps_come_back(server):
    client = Client(server, verbose=False)  # keyword calls, as in the README snippet
    gallery, seed, status = client.predict(prompt=PROMPT, steps=2, seed=5, randomize_seed=False, sampler="ddim",
                                           num_images=2, api_name="/generate")
    assert seed == 5 and "Seed 5" in status and "relation guidance 50" in status  # on by default
    assert "object guidance" not in status  # a relation prompt: the relation term only
    assert [Image.open(item["image"]).size for item in gallery] == [(256, 256)] * 2
    off = client.predict(prompt=PROMPT, steps=2, seed=5, randomize_seed=False, sampler="ddim", num_images=2,
                         relation_guidance=0, object_guidance=0, api_name="/generate")[2]
    assert "Seed 5" in off and "relation guidance" not in off and "object guidance" not in off

    words, word, heads, grid, summary = client.predict(image=1, layer="all", time_bin=0, api_name="/attention")
    assert [w["caption"] for w in words] == ["a", "red", "circle", "above", "a #2", "blue", "square"]
    assert word == "red" and [h["caption"] for h in heads] == ["head 1", "head 2"] and "Image 2" in summary
    assert Image.open(words[0]["image"]).size == (256, 256) and Image.open(grid).width > 256
    one_head = client.predict(image=1, layer="mid.0.cross_attn", head=1, word="blue", api_name="/attention")
    assert one_head[1] == "blue" and "mid.0.cross_attn" in one_head[4] and "head 2" in one_head[4]

    target, self_maps = client.predict(image=1, pixel_y=8, pixel_x=8, api_name="/self_attention")
    # 2 sampling steps, each in a timestep bin of its own: the mean's label names the steps recorded
    assert self_maps[0]["caption"] == "all layers (mean) · steps 1, 2" and len(self_maps) > 1

    with zipfile.ZipFile(client.predict(api_name="/export_maps")) as z:
        assert {"maps.json", "maps.npz"} <= set(z.namelist())


def test_live_bad_input_is_an_error_and_the_server_keeps_answering(server):
    client = Client(server, verbose=False)
    with pytest.raises(AppError, match="prompt has 400 characters; the limit is 300"):
        client.predict("x" * 400, "", 2, 4.0, 5, False, "ddim", 1, api_name="/generate")
    with pytest.raises(AppError, match=r"relation_guidance must be a number from 0 to 200 \(0 turns it off\); "
                                       r"got -1"):
        client.predict(PROMPT, "", 2, 4.0, 5, False, "ddim", 1, -1, api_name="/generate")
    with pytest.raises(AppError, match="generate images first"):
        client.predict(0, "all", 0, -1, "minmax", False, False, 0.6, "", api_name="/attention")
    _, seed, _ = client.predict("a red circle", "", 1, 4.0, 3, False, "ddim", 1, api_name="/generate")
    assert seed == 3
    with pytest.raises(AppError, match=r"pixel_x must be a whole number from 0 to 15 .*got 'NaN' \(text\)"):
        client.predict(pixel_x="NaN", api_name="/self_attention")  # this session has maps now
    with pytest.raises(AppError, match=r"num_images must be a whole number from 1 to 8; got \[1, 2\]"):
        client.predict(prompt="a red circle", num_images=[1, 2], api_name="/generate")


def test_live_each_request_draws_with_the_model_it_names(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    demo = app.build_demo({"shapes": pipe, "own": tiny_pipeline(OWN_CAPTIONS, grammar=None)})
    try:
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
        client = Client(url, verbose=False)
        form = {"prompt": "a polar bear", "steps": 1, "seed": 0, "randomize_seed": False, "num_images": 1}
        assert "unknown words: polar, bear" in client.predict(**form, api_name="/generate")[2]  # the default: shapes
        assert "unknown words" not in client.predict(**form, model="own", api_name="/generate")[2]
        words = client.predict("a polar bear", "", 1, 4.0, 0, "ddim", "own", api_name="/word_maps")[2]
        assert list(words["words"]) == ["a", "polar", "bear"] and not words["warnings"]
        with pytest.raises(AppError, match="model must be one of 'shapes', 'own'; got 'cat'"):
            client.predict(**form, model="cat", api_name="/generate")
    finally:
        demo.close()


def test_torch_work_leaves_the_cores_a_running_fine_tune_holds():
    class Jobs:  # a fine-tune on one thread, running or not
        threads, name = 1, None

        def running(self):
            return self.name

    threads, jobs, seen = app.TorchThreads(), Jobs(), []

    def work():  # on a thread of its own: the test process's torch threads stay as they are
        threads.fit()  # not set up (no main()): left alone
        seen.append(torch.get_num_threads())
        threads.cores, threads.jobs = 4, jobs
        for name in ("mine", None, "mine"):
            jobs.name = name
            threads.fit()
            seen.append(torch.get_num_threads())

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen[1:] == [3, 4, 3]


def test_all_torch_work_runs_on_one_thread(pipe):
    # libgomp gives each thread that runs torch its own OpenMP team; two teams on 2 cores made sampling
    # 60% slower (app.py, "one thread for all torch work").
    from concurrent.futures import ThreadPoolExecutor

    @app.on_torch_thread
    def where() -> tuple[str, str]:
        inner = app.on_torch_thread(lambda: threading.current_thread().name)()  # from the torch thread: no deadlock
        return threading.current_thread().name, inner

    with ThreadPoolExecutor(3) as callers:  # Gradio calls handlers from several worker threads
        names = set(callers.map(lambda _: where(), range(6))) | {where()}
    assert len(names) == 1
    outer, inner = names.pop()
    assert outer == inner and outer.startswith("torch-compute")
    wrapper_code = app.on_torch_thread(lambda: None).__code__
    for handler in (app.load_pipeline, app.warm_up, app.generate, app.render_attention, app.render_self_attention,
                    app.word_maps_report):
        assert handler.__code__ is wrapper_code, handler.__name__
    demo = app.build_demo(pipe)
    try:
        assert demo.maps_budget.executor is app._COMPUTE  # sessions' maps are released on that thread too
    finally:
        demo.close()
