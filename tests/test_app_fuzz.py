"""Every bad request gets a clear answer: seeded fuzzing of every endpoint's parameters.

Each case starts from a valid request and replaces one to three of its parameters with what a stranger's
script might send: wrong types, NaN and infinities, huge and negative numbers, empty and 100,000-character
strings, lists and dicts where numbers belong, or valid values at the edges. Most cases call the handlers
Gradio calls, in-process (the same validation layer, the same code after it); a smaller sample goes through
gradio_client to a live server. Every call must succeed, or fail with gr.Error (AppError through the client)
whose message begins with the name of a parameter the case replaced; the server must still answer after.
"""

import math
import os
import random
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
from diffusion.limits import Choice, Flag, Text, Whole
from tests.serving import free_port
from tests.tiny import tiny_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning", "ignore::UserWarning")

# Valid requests, cheap to run on the tiny model (16 px, 1 image, 1 step); "result" is the session's last run.
BASE = {
    "generate": {"prompt": "a red circle", "negative_prompt": "", "steps": 1, "guidance": 4.0, "seed": 0,
                 "randomize_seed": False, "sampler": "ddim", "num_images": 1, "relation_guidance": 50.0,
                 "object_guidance": 20.0, "model": "default"},
    "attention": {"image": 0, "layer": "all", "time_bin": 0, "head": -1, "normalization": "minmax",
                  "special_tokens": False, "negative": False, "alpha": 0.6, "word": ""},
    "self_attention": {"image": 0, "time_bin": 0, "pixel_y": 8, "pixel_x": 8, "alpha": 0.6},
    "export_maps": {"self_attention": False},
    "word_maps": {"prompt": "a red circle", "negative_prompt": "", "steps": 1, "guidance": 4.0, "seed": 0,
                  "sampler": "ddim", "model": "default"},
    "compare": {"prompt": "a red circle", "prompt_b": "", "model_a": "default", "model_b": "default", "steps": 1,
                "guidance": 4.0, "seed": 0, "sampler": "ddim", "num_images": 1, "normalization": "absolute"},
}
STATEFUL = {"attention", "self_attention", "export_maps"}  # they read the session's last run
# What scripts send. The last group is valid somewhere (an edge, another parameter's value): a clear error or
# an answer, never a crash.
HUGE, LIST, DICT = "x" * 100_000, [1, 2], {"a": 1}
ALWAYS_BAD = [math.nan, math.inf, -math.inf, HUGE, LIST, DICT]  # wrong for every parameter
ODD = ALWAYS_BAD + [
    "NaN", "inf", "", " ", "x" * 301, [], None,
    -1, -10**12, 10**12, 2**53 + 1, 1e308, -0.0, 2.5, "20", "1", "<b>bold</b>", "\x00", "ＲＥＤ ⭕", "(((red:",
    "a (red:11) circle", True, False, 0, 1, 2, 3, 15, 16, 0.6, 1.0, 20.0, 100.0, 200.0, 2**31 - 1, "all", "ddim",
    "dpm++", "minmax", "tokens", "mid.0.cross_attn", "a red circle", "red",
]
COSTLY = {"steps": 3, "num_images": 2}  # a valid but larger value is cut to this: the suite stays fast
# Valid wherever the session's last run has at least one image and step (the tiny model: 16 px, 2 heads).
VALID_IN_ANY_RUN = {"image": [0], "layer": ["all", "mid.0.cross_attn"], "time_bin": [0, 1], "head": [-1, 0, 1],
                    "pixel_y": [0, 8, 15], "pixel_x": [0, 8, 15],
                    # the served model's name ("": the default), as build_demo checks it
                    "model": ["default", ""], "model_a": ["default", ""], "model_b": ["default", ""]}


def valid_value(name: str, rng: random.Random):
    """A value the parameter's check accepts: an edge or one between (app.CHECKS, or VALID_IN_ANY_RUN)."""
    if name in VALID_IN_ANY_RUN:
        return rng.choice(VALID_IN_ANY_RUN[name])
    check = app.CHECKS[name]
    if isinstance(check, Flag):
        return rng.choice([True, False])
    if isinstance(check, Choice):
        return rng.choice(check.options)
    if isinstance(check, Text):
        return rng.choice(["a red circle", "a (blue:1.5) square above a red circle", "ＲＥＤ ⭕", "a" * check.max_chars,
                           "<b>bold</b>"] + ([] if check.required else ["", None]))
    if isinstance(check, Whole):
        return rng.choice([check.low, check.high, rng.randint(check.low, check.high)])
    return rng.choice([float(check.low), float(check.high), rng.uniform(check.low, check.high)])


def cases(seed: int, n: int, endpoints=tuple(BASE)) -> list[tuple[str, dict, dict]]:
    """n (endpoint, arguments, replaced) triples, seeded."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        endpoint = rng.choice(endpoints)
        names = list(BASE[endpoint])
        how_many = min(rng.choice((1, 1, 2, 3)), len(names))
        replaced = {name: rng.choice(ODD) if rng.random() < 0.7 else valid_value(name, rng)
                    for name in rng.sample(names, how_many)}
        args = {**BASE[endpoint], **replaced}
        for name, cap in COSTLY.items():  # valid but slow: made cheap; still a replaced value
            if isinstance(args.get(name), int | float) and not isinstance(args[name], bool) and \
                    math.isfinite(args[name]) and cap < args[name] <= 100 and float(args[name]).is_integer():
                args[name] = replaced[name] = cap
        out.append((endpoint, args, replaced))
    return out


def assert_clear(error_message: str, replaced: dict) -> None:
    """The error names one of the parameters the case replaced, first thing."""
    assert any(error_message.startswith(name) for name in replaced), (error_message[:300], list(replaced))


def must_fail(replaced: dict) -> bool:
    return any(value is bad for value in replaced.values() for bad in ALWAYS_BAD)


# -- in-process ---------------------------------------------------------------------------------
class NoProgress:
    def __call__(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        blocks = app.build_demo(tiny_pipeline())
        yield blocks
        blocks.close()


def handler(demo: gr.Blocks, api_name: str):
    """The function Gradio calls for a named endpoint."""
    return next(fn.fn for fn in demo.fns.values() if fn.api_name == api_name)


def call_in_process(demo: gr.Blocks, endpoint: str, args: dict, session: dict) -> None:
    """Call an endpoint's handler as Gradio would: the session's last run in, a new one kept."""
    fn = handler(demo, endpoint)
    if endpoint in STATEFUL:
        fn(result=session["result"], **args)
    elif endpoint == "generate":
        session["result"] = fn(**args, progress=NoProgress())[3]
    else:
        fn(**args)


def run_in_process(demo: gr.Blocks, seed: int, n: int) -> dict[str, int]:
    """n seeded cases through the handlers; how many were answered and how many refused."""
    session = {}
    call_in_process(demo, "generate", {**BASE["generate"], "num_images": 2}, session)
    counts = {"ok": 0, "error": 0}
    for endpoint, args, replaced in cases(seed, n):
        try:
            call_in_process(demo, endpoint, args, session)
        except gr.Error as e:
            assert_clear(e.message, replaced)
            counts["error"] += 1
        else:
            assert not must_fail(replaced), f"{endpoint} accepted {replaced}"
            counts["ok"] += 1
    return counts


def test_a_few_hundred_fuzzed_calls_get_an_answer_or_a_clear_error(demo):
    start = time.perf_counter()
    counts = run_in_process(demo, seed=0, n=400)
    # both kinds were exercised (compare's ten parameters make errors likelier: ~95 answers of 400 at seed 0)
    assert counts["error"] > 200 and counts["ok"] > 80, counts
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_thousands_of_fuzzed_calls_get_an_answer_or_a_clear_error(demo):
    counts = run_in_process(demo, seed=1, n=5000)
    assert counts["error"] > 2500 and counts["ok"] > 1000, counts


def test_the_fuzz_cases_cover_every_parameter_of_every_endpoint(demo):
    replaced = {(endpoint, name) for endpoint, _, r in cases(0, 400) for name in r}
    every = {(endpoint, name) for endpoint, args in BASE.items() for name in args}
    assert replaced == every
    api = demo.get_api_info()["named_endpoints"]
    assert {f"/{e}" for e in BASE} == set(api)  # no endpoint left out
    for endpoint, args in BASE.items():  # and no parameter
        assert [p["parameter_name"] for p in api[f"/{endpoint}"]["parameters"]] == list(args)


# -- a live server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(demo):
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    yield url


def test_fuzzed_calls_through_gradio_client_get_a_clear_error_and_the_server_keeps_answering(server):
    client = Client(server, verbose=False)
    client.predict(**{**BASE["generate"], "num_images": 2}, api_name="/generate")  # maps for this session
    # JSON has no NaN or infinity, and gradio_client refuses to send them ("Out of range float values are not JSON
    # compliant"): those cases run in-process only
    live = [c for c in cases(2, 200) if not any(isinstance(v, float) and not math.isfinite(v) for v in c[2].values())]
    errors = 0
    for endpoint, args, replaced in live[:60]:
        try:
            client.predict(**args, api_name=f"/{endpoint}")
        except AppError as e:
            assert_clear(str(e), replaced)
            errors += 1
        else:
            assert not must_fail(replaced), f"{endpoint} accepted {replaced}"
    assert errors > 25
    _, seed, status = client.predict(**{**BASE["generate"], "seed": 7}, api_name="/generate")
    assert seed == 7 and "Seed 7" in status
