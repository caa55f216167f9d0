"""Gradio app: type a prompt, get samples, and see where every word (and every pixel) looked.

    python app.py                                  # serves weights/default (and an MCP server)
    python app.py --model runs/default/pipeline    # any pipeline folder written by train.py
    python app.py --model owner/name --port 7861   # a hub id (downloaded once, then cached)

The UI is wiring only: sampling and attention recording live in `diffusion.pipeline`, map aggregation and
overlays in `diffusion.maps`, the explorer's pictures (word, head and layer views, where a pixel looked, what is
shown) in `diffusion.render`, what the loaded model knows (its example prompts, its words, the prompt words it
never saw, whether layout guidance reads its prompts, and the notes that say so) in `diffusion.vocabulary`, from
the model's own tokenizer and caption summary: nothing here assumes a vocabulary. What stays here: the validation
layer (`CHECKS`, `validated`: the API's contract by parameter name), the one torch thread, the MCP rules, the
Blocks and their events (`build_demo`), and `main()`. `build_demo(models)` returns the Blocks; the models are
loaded once, in `main()`, and nothing heavy happens at import time (as a Space runs it).

Named API endpoints (gradio_client): `generate` (samples + seed), then, in the same client session,
`attention` (per-word overlays, per-head maps of one word, the layer × word grid), `self_attention` (where one
pixel looked, per self-attention layer) and `export_maps` (a zip of PNG + npz + JSON); `word_maps` does it in one
call (a sample, its word overlays and where each word looked, as numbers), for agents and scripts that keep no
session: it is the MCP tool at /gradio_api/mcp/ (see "agents" below). `compare` runs the same seeds through two
models or two prompts and returns both rows of samples and the first image's word maps aligned word by word.

A public Space runs for weeks, for strangers and their scripts: every parameter is checked in one place
(`validated`, with the limits of diffusion/limits.py) and a bad one gets an error naming it and what is
allowed; Gradio's cache, the exports and the sessions' maps are bounded (`diffusion.serving`: `Settings` from
environment variables or flags, `MapsBudget`, `CacheKeeper`).
"""

import argparse
import contextvars
import functools
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import gradio as gr
import pandas as pd
import torch
from PIL import Image

from diffusion import render, vocabulary
from diffusion.layout import OBJECT_GUIDANCE, RELATION_GUIDANCE
from diffusion.limits import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_NAME_CHARS,
    MAX_OBJECT_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_RELATION_GUIDANCE,
    MAX_SEED,
    MAX_STEPS,
    Check,
    Choice,
    Flag,
    InvalidInput,
    Prompt,
    Real,
    Text,
    Whole,
)
from diffusion.maps import AttentionMaps
from diffusion.pipeline import GenerationResult, TextToImagePipeline, model_folders
from diffusion.prompts import MAX_WEIGHT
from diffusion.render import ALL_LAYERS, MEAN_HEADS, NORMALIZATION_LABELS
from diffusion.sampling import DEFAULT_SAMPLER, SAMPLERS
from diffusion.serving import CacheKeeper, MapsBudget, Settings, add_settings_flags
from diffusion.vocabulary import CAPTIONS_FILE, example_prompts
from finetune_jobs import Busy, FineTuneJobs

DEFAULT_MODEL = "weights/default"
FINETUNE_ROOT = "runs/app"  # the Fine-tune tab's runs (settings.finetune_keep_runs of them), unless --finetune-dir
log = logging.getLogger(__name__)

SAMPLES_WIDTH = 640  # about the samples gallery's width on a laptop screen, for its height
TIME_BINS = 4  # the explorer's timestep bins (fewer when a run has fewer steps)

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="pink")
# Browsers smooth upscaled images; tiny samples must stay crisp pixels.
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
#title { margin-bottom: 0; }
#status { min-height: 2.5em; }
.small-note { font-size: 0.9em; opacity: 0.85; }
"""


# -- one thread for all torch work ------------------------------------------------------------------
# PyTorch's OpenMP (libgomp) gives every thread that starts a parallel region its own team of worker
# threads. Once teams hold more threads than there are cores, libgomp stops spinning between regions
# and sleeps instead, and a U-Net step took 92 instead of 58 ms (a 4-image, 20-step call 2.4 instead
# of 1.5 s; measured on 2 cores). Gradio runs handlers on its own worker threads, so the app's torch
# work (loading, warm-up, sampling, rendering maps) all goes through this one thread.
_TORCH_THREAD = "torch-compute"
_COMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_TORCH_THREAD)


class TorchThreads:
    """How many threads the torch thread's OpenMP team has: every core (main() sets `cores`), less those a
    running fine-tune holds. A team that shares a core with another process waits for it at every barrier:
    4 images × 20 steps with maps took 2.9 s on 2 threads beside a niced one-thread trainer, 1.39 s on 1
    (0.92 s on 2 with the machine free; AMX host, 2026-12-07). Unset (tests, a caller's own Blocks): left alone."""

    def __init__(self):
        self.cores: int | None = None
        self.jobs: FineTuneJobs | None = None

    def fit(self) -> None:
        """On the torch thread, before each piece of work."""
        if self.cores is None:
            return
        busy = self.jobs.threads if self.jobs is not None and self.jobs.running() else 0
        want = max(1, self.cores - busy)
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)


THREADS = TorchThreads()


def _fitted(fn, *args, **kwargs):
    THREADS.fit()
    return fn(*args, **kwargs)


def on_torch_thread(fn):
    """Run `fn` on the app's one torch thread and wait for it. Gradio's context goes along, so progress
    bars and warnings still reach their event; a call from that thread itself runs directly."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread().name.startswith(_TORCH_THREAD):
            return fn(*args, **kwargs)
        return _COMPUTE.submit(contextvars.copy_context().run, _fitted, fn, *args, **kwargs).result()

    return wrapper


# -- requests: one validation layer -----------------------------------------------------------------
# Every handler's parameters are checked here, by name, before it runs: the same checks for the browser, API
# clients and MCP agents, against the limits of diffusion/limits.py. Gradio's own preprocessing is off for
# these events (preprocess=False): it raised plain exceptions (NaN in a whole-number field, a list for a
# number) that reached API clients as "The upstream Gradio app has raised an exception" — 41 of 304 fuzzed
# calls — and its range errors named no parameter.
CHECKS: dict[str, Check] = {
    "prompt": Prompt(MAX_PROMPT_CHARS, required=True),
    "negative_prompt": Text(MAX_PROMPT_CHARS),
    "steps": Whole(1, MAX_STEPS),
    "guidance": Real(0, MAX_GUIDANCE),
    "seed": Whole(0, MAX_SEED),
    "randomize_seed": Flag(),
    "sampler": Choice(tuple(sorted(SAMPLERS))),
    "num_images": Whole(1, MAX_IMAGES),
    "relation_guidance": Real(0, MAX_RELATION_GUIDANCE, " (0 turns it off)"),
    "object_guidance": Real(0, MAX_OBJECT_GUIDANCE, " (0 turns it off)"),
    "normalization": Choice(tuple(NORMALIZATION_LABELS)),
    "special_tokens": Flag(),
    "negative": Flag(),
    "alpha": Real(0, 1),
    "word": Text(MAX_NAME_CHARS),
    "self_attention": Flag(),
    "model": Text(MAX_NAME_CHARS),  # which of the served models: build_demo checks the name against them
    # The Compare tab: two models (checked against the served ones like model) or two prompts, the same seeds.
    "model_a": Text(MAX_NAME_CHARS),
    "model_b": Text(MAX_NAME_CHARS),
    "prompt_b": Prompt(MAX_PROMPT_CHARS),  # "": the first prompt
    "compare_image": Whole(0, MAX_IMAGES - 1, " (0 is the first image)"),  # and below the comparison's count
}
# Bounds that follow the session's last run (its images, timestep bins, layers, heads and size): made per call
# from its maps and the values checked before them (a layer's head count).
RUN_CHECKS: dict[str, Callable[[AttentionMaps, dict], Check]] = {
    "image": lambda maps, _: Whole(0, maps.num_images - 1, " (0 is the first image)"),
    "layer": lambda maps, _: Choice((ALL_LAYERS, *maps.layers("cross"))),
    "time_bin": lambda maps, _: Whole(0, len(maps.bins), " (0: all steps)"),
    "head": lambda maps, values: Whole(MEAN_HEADS, render.max_heads(maps, values.get("layer", ALL_LAYERS)) - 1,
                                       f" ({MEAN_HEADS}: the mean of heads)"),
    "pixel_y": lambda maps, _: Whole(0, maps.image_size[0] - 1, f" (a row of the {maps.image_size[0]}-pixel image)"),
    "pixel_x": lambda maps, _: Whole(0, maps.image_size[1] - 1, f" (a column of the {maps.image_size[1]}-pixel "
                                                                 "image)"),
}
NO_EXAMPLES = (f"No examples: this model's folder has no summary of its training captions ({CAPTIONS_FILE}). Describe "
               "an image in the words it was trained on; 'What this model knows' lists its tokenizer's words.")
RUN = "result"  # the session's last GenerationResult: a handler that reads it needs its maps
TRUSTED = {"pipe", "pipes", "comparison", "progress", "evt"}  # set by the app or by Gradio, never by a client
NO_MAPS = ("No maps in this session: generate images first. The explorer shows the session's last run; its "
           "maps are released when the session ends, some time after the run, or when the server needs the room.")


def checked_arguments(names: list[str], args: tuple, kwargs: dict) -> dict:
    """The arguments by name, each parsed by its check; raises InvalidInput naming the first bad one."""
    values = dict(zip(names, args, strict=False)) | kwargs
    out = {n: CHECKS[n].parse(n, v) if n in CHECKS else v for n, v in values.items()}
    if RUN in values:
        result = values[RUN]
        if not isinstance(result, GenerationResult) or result.attention is None:
            raise InvalidInput(NO_MAPS)
        for name in [n for n in names if n in RUN_CHECKS and n in values]:  # in order: layer before head
            out[name] = RUN_CHECKS[name](result.attention, out).parse(name, values[name])
    return out


def validated(fn: Callable) -> Callable:
    """Check fn's arguments by name (CHECKS, RUN_CHECKS) before it runs, and answer every failure with gr.Error.

    Bad input raises InvalidInput; a ValueError from below (the pipeline's: an emphasis weight out of range)
    is the request's fault too, and both reach the user as their message (API clients: AppError). Anything
    else is a bug: logged with its traceback, and answered as one rather than as Gradio's unexplained error.
    A parameter without a check is refused here, when the app is built, not found by a fuzzer later."""
    names = list(inspect.signature(fn).parameters)
    unchecked = [n for n in names if n not in CHECKS and n not in RUN_CHECKS and n not in TRUSTED and n != RUN]
    if unchecked:
        raise TypeError(f"{fn.__name__} has parameters without a check: {unchecked}; add them to app.CHECKS.")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(**checked_arguments(names, args, kwargs))
        except gr.Error:
            raise
        except (ValueError, FloatingPointError) as e:
            raise gr.Error(str(e), print_exception=False) from e
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            raise gr.Error(f"{fn.__name__} failed ({type(e).__name__}: {e}). This is a bug in the app, not in "
                           "your request: please report it with the request.") from e

    return wrapper


def with_limits(fn: Callable, checks: dict[str, Check] = CHECKS) -> Callable:
    """Fill an API handler's docstring placeholders ({steps}) with its checks' allowed values ("a whole number
    from 1 to 100"), and write each argument of its Args section on one line: the API page and the MCP tool
    descriptions state the limits of CHECKS, and only those. (Gradio's docstring parser reads one line per
    argument: the rest of a wrapped description, often its limits, would be lost.)"""
    fn.__doc__ = one_line_args(fn.__doc__.format_map({name: check.describe() for name, check in checks.items()}))
    return fn


def one_line_args(doc: str) -> str:
    """A Google-style docstring with each argument of its Args section joined onto one line."""
    out, in_args, indent = [], False, None
    for line in inspect.cleandoc(doc).splitlines():
        stripped, depth = line.strip(), len(line) - len(line.lstrip())
        if stripped in ("Args:", "Returns:"):
            in_args, indent = stripped == "Args:", None
        elif in_args and stripped:
            indent = depth if indent is None else indent
            if depth > indent:  # a continuation line
                out[-1] += " " + stripped
                continue
        out.append(line)
    return "\n".join(out)


@validated
def check_generate(prompt: str, negative_prompt: str, steps: int, guidance: float, seed: int, randomize_seed: bool,
                   sampler: str, num_images: int, relation_guidance: float, object_guidance: float,
                   model: str = "") -> None:
    """The generate form's checks alone (validated runs them), as the first step of the browser's Generate:
    a bad request shows a toast and leaves the last samples on screen (an error in generate blanks them)."""


# -- agents (MCP) ------------------------------------------------------------------------------------
# Gradio's MCP server (launch(mcp_server=True)) calls every tool through one gradio_client of its own, so all
# agents share one session. The tools that read a session's last run (attention, self_attention, export_maps)
# would show one agent another's run, and generate, which leaves its run there, fails over MCP in Gradio 6.31
# unless the client asks for progress (its State output is popped from a one-item list): they stay off the MCP
# tool list (API clients, each with its own session, keep them all), and a generate called over MCP anyway keeps
# no maps in that shared session. word_maps gives an agent a sample and where its words looked, in one call.
MCP_USER = ("x-gradio-user", "mcp")  # the header Gradio's MCP client sends with every call
MCP_NOTE = ("Over MCP no maps are kept (every agent shares one session): word_maps returns a sample and where "
            "its words looked, in one call.")


def session_tool(fn: Callable) -> Callable:
    """Keep an endpoint that writes or reads the session's last run off the MCP tool list. Gradio lists a function as a
    tool when it has no _mcp_type or _mcp_type "tool" (what gr.mcp.tool sets); tests/test_app_mcp.py checks it."""
    fn._mcp_type = "session"
    return fn


def over_mcp(request: gr.Request | None) -> bool:
    return request is not None and request.headers.get(MCP_USER[0]) == MCP_USER[1]


RELATION_INFO = ("In 'A above B', 'A to the left of B' (or 'A over B', 'A at the top and B at the bottom' …), nudge "
                 "the first steps' noise so that A's words look above (left of) B's; 0 turns it off. Other prompts "
                 "are not touched.")
OBJECT_INFO = ("In 'A and B' (two objects or more, no relation), nudge the first steps' noise so that every object's "
               "words are looked at somewhere (Attend-and-Excite), so none is left out; in 'three X', so that X's "
               "words look at three places, not four. 0 turns it off. Other prompts are not touched.")


def layout_off(pipe: TextToImagePipeline) -> str:
    """' (why layout guidance does not read this model's prompts)' for the sliders' info, or ''."""
    return vocabulary.layout_off_aside(pipe.captions, pipe.layout_grammar)


def placeholder_for(examples: list[str]) -> str:
    return examples[0] if examples else "describe the image"


# -- generation -----------------------------------------------------------------------------------
@on_torch_thread
@validated
def generate(pipe: TextToImagePipeline, prompt: str, negative_prompt: str, steps: int, guidance: float, seed: int,
             randomize_seed: bool, sampler: str, num_images: int, relation_guidance: float = RELATION_GUIDANCE,
             object_guidance: float = OBJECT_GUIDANCE,
             progress: gr.Progress | None = None) -> tuple[list, int, str, GenerationResult]:
    """Sample with attention recording on. Returns gallery items, the seed used, a status line, the result."""
    if randomize_seed:
        seed = int.from_bytes(os.urandom(4), "little") % (MAX_SEED + 1 - MAX_IMAGES)
    progress = progress or (lambda *args, **kwargs: None)

    def on_step(step: int, timestep: int, total: int) -> None:
        progress((step, total), desc="Denoising", unit="steps")

    progress(0, desc="Encoding the prompt")
    start = time.perf_counter()
    result = pipe(prompt, negative_prompt=negative_prompt or None, num_images=num_images, steps=steps,
                  guidance_scale=guidance, seed=seed, sampler=sampler, record_attention=True, callback=on_step,
                  attention_bins=TIME_BINS, relation_guidance=relation_guidance, object_guidance=object_guidance)
    seconds = time.perf_counter() - start

    for warning in result.warnings:
        gr.Warning(warning)
    gallery = [(render.upscale(im), f"seed {s}") for im, s in zip(result.images, result.seeds, strict=True)]
    layout = layout_note(result, relation_guidance, object_guidance)
    status = (f"**Seed {result.seed}** (image *i* uses seed {result.seed} + *i* − 1) · {steps} {sampler} steps · "
              f"guidance {guidance:g}{layout} · {seconds:.1f} s. "
              "Click a sample to explore it below.")
    status += "".join(f"\n\n{note[:1].upper()}{note[1:]}" for note in result.guidance_notes)  # a sentence of its own
    status += "".join(f"\n\n⚠️ {w}" for w in result.warnings)
    return gallery, result.seed, status, result


def layout_note(result: GenerationResult, relation_guidance: float, object_guidance: float) -> str:
    """' · relation guidance 50 · object guidance 20' for the status line: the terms that nudged this call."""
    return ((f" · relation guidance {float(relation_guidance):g}" if result.relation_guided else "")
            + (f" · object guidance {float(object_guidance):g}" if result.object_guided else ""))


# -- attention explorer ---------------------------------------------------------------------------
@validated
def explorer_choices(result: GenerationResult) -> tuple:
    """UI updates for a new result: gallery columns, images, layers with resolutions, heads, timestep bins."""
    maps = result.attention
    n = len(result.images)
    columns = 1 if n == 1 else 2 if n <= 4 else 3
    height = 40 + -(-n // columns) * SAMPLES_WIDTH // columns  # rows of square cells: no blank box, no crop
    images = [(f"image {i + 1} · seed {s}", i) for i, s in enumerate(result.seeds)]
    layers = [("all layers (mean)", ALL_LAYERS)] + [
        (f"{name} · {'×'.join(map(str, maps.layer_size(name)))}", name) for name in maps.layers("cross")]
    heads = [("mean of heads", MEAN_HEADS)] + [(f"head {h + 1}", h) for h in range(render.max_heads(maps, ALL_LAYERS))]
    bins = maps.bins
    bin_info = "0 = all steps · " + " · ".join(
        f"{b + 1}: {render.steps_label(r)}" for b, r in enumerate(bins)) + " (1 is the noisiest)"
    return (gr.update(columns=columns, height=height), gr.update(visible=True), gr.update(visible=False),
            gr.update(choices=images, value=0), gr.update(choices=layers, value=ALL_LAYERS),
            gr.update(choices=heads, value=MEAN_HEADS), gr.update(maximum=len(bins), value=0, info=bin_info))


@session_tool
@on_torch_thread
@validated
@with_limits
def render_attention(result: GenerationResult, image: int, layer: str, time_bin: int, head: int,
                     normalization: str, special_tokens: bool, negative: bool, alpha: float, word: str):
    """Where each word of the prompt looked in one image of this session's last generate run: one heat-map
    overlay per word, each attention head's map of one word, and a layer × word grid. Call generate first,
    in the same session.

    Args:
        image: which image of the last run, 0 for the first.
        layer: a cross-attention layer's name (e.g. "mid.0.cross_attn"), or "all" for the mean of all layers.
        time_bin: 0 for all denoising steps, or 1 to 4 for a quarter of them (1 is the noisiest).
        head: an attention head, 0 for the first, or -1 for the mean of heads.
        normalization: "minmax" (each word's map on its own), "absolute" (compare words) or "tokens" (which word
            wins each pixel).
        special_tokens: also show CLIP's start and end tokens.
        negative: show the negative prompt's words instead.
        alpha: how opaque the heat map is over the image, 0 to 1.
        word: the word of the per-head view ("" for the first content word).

    Returns:
        the word overlays (captioned with their words), the word of the per-head view, its per-head overlays,
        the layer × word grid, and a line saying what is shown.
    """
    return render.word_views(result, image, layer, time_bin, head, normalization, special_tokens, negative, alpha, word)


@validated
def word_choices(result: GenerationResult, image: int, special_tokens: bool, negative: bool, word: str) -> dict:
    """The word selector's choices for the words shown (they change with image, negative and start/end)."""
    # The keys of word_maps, so labels match ("a #2" for a repeated word); computing one map is cheap.
    words = list(result.attention.word_maps(image, negative=negative, include_special=special_tokens))
    return gr.update(choices=words, value=render.focus(words, word))


@session_tool
@on_torch_thread
@validated
@with_limits
def render_self_attention(result: GenerationResult, image: int, time_bin: int, pixel_y: int, pixel_x: int,
                          alpha: float):
    """Where one pixel of an image of this session's last generate run looked, in each self-attention layer
    and in their mean. Call generate first, in the same session.

    Args:
        image: which image of the last run, 0 for the first.
        time_bin: 0 for all recorded steps, or 1 to 4 for a quarter of the denoising steps (1 is the noisiest).
        pixel_y: the pixel's row in the sample (0 is the top; samples are 32 pixels high for the shipped model).
        pixel_x: the pixel's column (0 is the left).
        alpha: how opaque the heat map is over the image, 0 to 1.

    Returns:
        the sample with the pixel ringed, and one overlay per self-attention layer (the first is their mean).
    """
    return render.self_attention_views(result, image, time_bin, (pixel_y, pixel_x), alpha)


@validated
def click_pixel(result: GenerationResult, image: int, evt: gr.SelectData) -> tuple[int, int]:
    """A click on the upscaled sample (x, y in display pixels) → the sample's pixel (y, x)."""
    return render.display_to_pixel(evt.index, result.attention.image_size)


@validated
def gallery_index(evt: gr.SelectData) -> int:
    return evt.index


@on_torch_thread
@validated
def word_maps_report(pipe: TextToImagePipeline, prompt: str, negative_prompt: str, steps: int, guidance: float,
                     seed: int, sampler: str) -> tuple[Image.Image, Image.Image, dict]:
    """One image and where each of its prompt's words looked, with no session: the sample, a strip of its word
    overlays (all layers, all steps), and the words' maps as numbers (AttentionMaps.word_summary). Nothing of
    the run is kept: an agent or script that keeps no session gets everything in one call."""
    result = pipe(prompt, negative_prompt=negative_prompt or None, steps=steps, guidance_scale=guidance, seed=seed,
                  sampler=sampler, record_attention=True, attention_bins=TIME_BINS,
                  relation_guidance=RELATION_GUIDANCE, object_guidance=OBJECT_GUIDANCE)
    maps = result.attention
    summary = {"prompt": prompt, "seed": seed, "steps": steps, "image_size": list(maps.image_size),
               "words": maps.word_summary(0), "warnings": result.warnings}
    return render.upscale(result.images[0]), render.word_strip(result), summary


# -- comparing two models or two prompts ----------------------------------------------------------------------
NO_COMPARISON = ("No comparison in this session: press Compare first. Its maps are released when the session ends, "
                 "some time after the run, or when the server needs the room.")


@on_torch_thread
@validated
def compare_runs(pipes: tuple[TextToImagePipeline, TextToImagePipeline], model_a: str, model_b: str, prompt: str,
                 prompt_b: str, steps: int, guidance: float, seed: int, sampler: str, num_images: int,
                 normalization: str, progress: gr.Progress | None = None) -> tuple:
    """Sample the same seeds on side A (pipes[0], prompt) and side B (pipes[1], prompt_b, "" for the same prompt).

    Returns the two rows of samples, the first image's aligned word maps and differences with their note
    (render.comparison_view), and the render.Comparison for other images and normalisations."""
    progress = progress or (lambda *args, **kwargs: None)
    prompts = (prompt, prompt_b if prompt_b.strip() else prompt)
    runs = []
    for k, (pipe, text) in enumerate(zip(pipes, prompts, strict=True)):
        def on_step(step: int, timestep: int, total: int, k: int = k) -> None:
            progress((k * total + step, 2 * total), desc=f"Sampling side {'AB'[k]}", unit="steps")

        runs.append(pipe(text, num_images=num_images, steps=steps, guidance_scale=guidance, seed=seed, sampler=sampler,
                         record_attention=True, callback=on_step, attention_bins=TIME_BINS,
                         relation_guidance=RELATION_GUIDANCE, object_guidance=OBJECT_GUIDANCE))
    # Each side is named by what differs: the model, the prompt, or both.
    labels = [" · ".join(([m] if model_a != model_b else []) + ([f'"{t}"'] if prompts[0] != prompts[1] else []))
              or m for m, t in zip((model_a, model_b), prompts, strict=True)]
    comparison = render.Comparison(*runs, *labels)
    rows = [[(render.upscale(im), f"{side} · seed {s}") for im, s in zip(r.images, r.seeds, strict=True)]
            for side, r in zip("AB", runs, strict=True)]
    for side, r in zip("AB", runs, strict=True):
        for warning in r.warnings:
            gr.Warning(f"{side}: {warning}")
    grid, note = render.comparison_view(comparison, 0, normalization)
    return *rows, grid, note, comparison


@validated
def check_compare(prompt: str, prompt_b: str, model_a: str, model_b: str, steps: int, guidance: float, seed: int,
                  sampler: str, num_images: int, normalization: str) -> None:
    """The Compare form's checks alone, as the first step of the browser's Compare (as check_generate): a bad
    request shows a toast and leaves the last comparison on screen."""


def live_comparison(comparison) -> render.Comparison:
    """The session's comparison with its maps, or InvalidInput saying to compare first."""
    if not isinstance(comparison, render.Comparison) or comparison.a.attention is None or \
            comparison.b.attention is None:
        raise InvalidInput(NO_COMPARISON)
    return comparison


@on_torch_thread
@validated
def render_comparison(comparison: render.Comparison, compare_image: int, normalization: str) -> tuple:
    """Another image or normalisation of the session's comparison: the aligned word-map grid and its note."""
    return render.comparison_view(live_comparison(comparison), compare_image, normalization)


@validated
def comparison_images(comparison: render.Comparison) -> dict:
    """The image selector's choices for a new comparison (its count and seeds), on the first image."""
    seeds = live_comparison(comparison).a.seeds
    return gr.update(choices=[(f"image {i + 1} · seed {s}", i) for i, s in enumerate(seeds)], value=0)


def build_compare_tab(pipe_for: Callable[[str], TextToImagePipeline], model_names: Callable[[], list[str]],
                      budget: MapsBudget, cache: CacheKeeper, settings: Settings) -> None:
    """The Compare tab, inside build_demo's Blocks: the same seeds on two models (base vs fine-tuned) or two
    prompts on one (change one word), both rows of samples, and per image their word maps aligned word by word
    with the difference of each shared word's maps. Models are looked up when a request comes (pipe_for), and
    the selectors' choices refreshed from model_names() when the tab opens: models added later appear."""
    names = model_names()
    with gr.Tab("Compare", elem_id="compare-tab") as tab:
        gr.Markdown("The same prompt and seeds on two models, or two prompts on one model (change one word, keep "
                    "the seed): both rows of samples, then per image where each word looked in A and in B, in the "
                    "same column for a word of both prompts, and the difference of the two maps.",
                    elem_classes="small-note")
        comparison = gr.State(None, time_to_live=settings.session_ttl_s,
                              delete_callback=lambda c: [budget.release(r) for r in (c.a, c.b)] if c else None)
        with gr.Row():
            with gr.Column():
                model_a = gr.Dropdown(names, value=names[0], label="A drawn by", elem_id="compare-model-a")
                prompt = gr.Textbox(label="Prompt A", max_lines=2, elem_id="compare-prompt-a")
            with gr.Column():
                model_b = gr.Dropdown(names, value=names[-1], label="B drawn by", elem_id="compare-model-b")
                prompt_b = gr.Textbox(label="Prompt B", max_lines=2, placeholder="empty: prompt A",
                                      elem_id="compare-prompt-b", info="Empty: the same prompt as A.")
        with gr.Row():
            steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
            guidance = gr.Slider(0, MAX_GUIDANCE, value=4.0, step=0.5, label="Guidance scale")
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
            sampler = gr.Dropdown(sorted(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
            num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images")
            run = gr.Button("Compare", variant="primary", min_width=110)
        # A column per image, never widened: image i of A sits above image i of B (the same seed). One row of
        # square cells about 1/8 of a laptop screen's width (the "auto" height left a blank box under them).
        row = {"columns": MAX_IMAGES, "fit_columns": False, "height": 40 + 2 * SAMPLES_WIDTH // MAX_IMAGES,
               "format": "png", "object_fit": "contain", "allow_preview": False, "elem_classes": "pixelated"}
        samples_a = gr.Gallery(label="A", elem_id="compare-samples-a", **row)
        samples_b = gr.Gallery(label="B (same seeds)", elem_id="compare-samples-b", **row)
        with gr.Row():
            image = gr.Dropdown([(f"image {i + 1}", i) for i in range(MAX_IMAGES)], value=0, label="Compare image")
            normalization = gr.Radio([(label, value) for value, label in NORMALIZATION_LABELS.items()],
                                     value="absolute", label="Normalisation (both rows alike)", scale=3)
        note = gr.Markdown(elem_id="compare-note")
        grid = gr.Image(label="Word maps: A, B and A − B", format="png", interactive=False, elem_classes="pixelated",
                        buttons=["download", "fullscreen"], elem_id="compare-grid")

    @session_tool  # it keeps the comparison in the session (agents share one over MCP)
    @functools.partial(with_limits, checks={**CHECKS, "model_a": Choice(tuple(names)),
                                            "model_b": Choice(tuple(names))})
    def compare(prompt: str, prompt_b: str, model_a: str, model_b: str, steps: int, guidance: float, seed: int,
                sampler: str, num_images: int, normalization: str, progress=gr.Progress()):  # noqa: B008
        """Generate images from the same seeds with two models, or two prompts on one model, and show where each
        word looked in both, word by word: a word of both prompts in one column, with the difference of its two
        maps.

        Args:
            prompt: side A's prompt, e.g. "a red circle"; {prompt}.
            prompt_b: side B's prompt, e.g. "a blue circle", "" for A's (to compare two models); {prompt_b}.
            model_a: which of the served models draws side A; {model_a}.
            model_b: which of the served models draws side B; {model_b}.
            steps: denoising steps, 20 is a good start; {steps}.
            guidance: classifier-free guidance scale, 4 is a good start; {guidance}.
            seed: the random seed of both sides; image i uses seed + i; {seed}.
            sampler: the sampling method; {sampler}.
            num_images: how many images per side; {num_images}.
            normalization: "absolute" (both rows on one scale), "minmax" (each word's map on its own) or "tokens"
                (which word wins each pixel); {normalization}.

        Returns:
            side A's samples, side B's samples (256-pixel PNGs captioned with their seeds), the first image's word
            maps (rows A, B and A − B, a column per word), and a note on what is shown and which words moved most.
        """
        pipes = []
        for name, value in (("model_a", model_a), ("model_b", model_b)):
            try:
                pipes.append(pipe_for(value))
            except gr.Error as e:
                raise gr.Error(f"{name}: {e.message}", print_exception=False) from e
        shown = [m if isinstance(m, str) and m else model_names()[0] for m in (model_a, model_b)]
        *out, kept = compare_runs(tuple(pipes), *shown, prompt, prompt_b, steps, guidance, seed, sampler,
                                  num_images, normalization, progress=progress)
        cache.sweep()
        for run_ in (kept.a, kept.b):
            budget.hold(run_)
        return *out, kept

    def refresh_models(model_a: str, model_b: str) -> tuple:
        """The selectors offer the models served now (some may have been added since the page loaded)."""
        now = model_names()
        return tuple(gr.update(choices=now, value=v if v in now else now[0]) for v in (model_a, model_b))

    raw = {"preprocess": False}
    light = {"concurrency_id": "explorer", "concurrency_limit": 2, "show_progress": "minimal", **raw}
    inputs = [prompt, prompt_b, model_a, model_b, steps, guidance, seed, sampler, num_images, normalization]
    checked = gr.on([run.click, prompt.submit, prompt_b.submit], check_compare, inputs, None, api_visibility="private",
                    concurrency_id="checks", concurrency_limit=4, show_progress="hidden", **raw)
    compared = checked.success(compare, inputs, [samples_a, samples_b, grid, note, comparison], api_name="compare",
                               concurrency_id="sampling", **raw)
    compared.success(comparison_images, [comparison], image, api_visibility="private", **raw)
    gr.on([image.input, normalization.input], render_comparison, [comparison, image, normalization], [grid, note],
          api_visibility="private", **light)
    tab.select(refresh_models, [model_a, model_b], [model_a, model_b], api_visibility="private", **raw)


def maps_gallery(label: str, columns: int, **kwargs) -> gr.Gallery:
    """A gallery of 256 px overlays: fixed columns (a 2-word prompt must not blow maps up), exact PNG pixels."""
    return gr.Gallery(label=label, columns=columns, fit_columns=False, height="auto", format="png",
                      object_fit="contain", elem_classes="pixelated", **kwargs)


# -- fine-tuning ----------------------------------------------------------------------------------
FINETUNE_INTRO = (
    "Teach the model your own pictures: a zip of images with a `metadata.jsonl` (one line per picture: "
    '`{"file_name": "cat1.png", "text": "a grey cat on a sofa"}`) or a `metadata.csv` (columns `file_name,text`). '
    "The pictures are checked first; then `train.py` fine-tunes the model selected above on them in the background, "
    "and the result joins the Model selector. One fine-tune at a time on this machine; generating keeps working.")
FINETUNE_POLL_S = 2.0  # how often an open tab reads its run's progress, while it runs


def raw_path(value) -> str:
    """A gr.File's raw value (preprocess off): Gradio's FileData dict, or a path."""
    return (value.get("path") or "") if isinstance(value, dict) else (value or "")


def loss_table(losses: list[tuple[int, float]]) -> pd.DataFrame:
    return pd.DataFrame({"step": pd.Series([s for s, _ in losses], dtype="int64"),
                         "loss": pd.Series([v for _, v in losses], dtype="float64")})


def who_is(request: gr.Request | None) -> str:
    if request is None:
        return "someone"
    return request.username or f"session {(request.session_hash or '?')[:6]}"


def build_finetune_tab(demo: gr.Blocks, jobs: FineTuneJobs, model: gr.Dropdown,
                       add_model: Callable[[str, str], dict],
                       folder_for: Callable[[str], Path | None] = lambda name: None) -> None:
    """The Fine-tune tab: check pictures, train, follow (loss, ETA, validation grid), cancel, resume, share; a
    run starts from the model `model` selects (its folder: folder_for(name); None: the jobs' base), and a
    finished run's model is loaded and offered by `model` (add_model). The work is finetune_jobs.FineTuneJobs'."""
    steps_check = Whole(1, 100_000)
    with gr.Tab("Fine-tune", id="finetune"):
        gr.Markdown(FINETUNE_INTRO)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                upload = gr.File(label="Pictures (a zip)", file_types=[".zip"], elem_id="finetune-upload")
                source = gr.Textbox(label="…or a folder on this machine, or a hub dataset id (owner/name)",
                                    max_lines=1, visible=jobs.allow_local, elem_id="finetune-source")
            with gr.Column(scale=2):
                run_name = gr.Textbox(label="Run name", max_lines=1, placeholder="e.g. my-cats",
                                      info="Also its name in the selector above (default: tune-DATE-TIME)",
                                      elem_id="finetune-name")
                with gr.Accordion("Advanced", open=False):
                    steps = gr.Number(None, label="Training steps", precision=0, minimum=1, elem_id="finetune-steps",
                                      info="Empty: train.py's choice for the number of pictures (200 steps or "
                                           "more). A few steps: a quick try.")
                check = gr.Button("Check the pictures", variant="secondary", elem_id="finetune-check")
        report = gr.Markdown(elem_id="finetune-report")
        with gr.Row():
            run = gr.Dropdown(jobs.runs(), value=None, label="Run", allow_custom_value=False, scale=3,
                              elem_id="finetune-run")
            start = gr.Button("Train", variant="primary", scale=1, elem_id="finetune-start")
            cancel = gr.Button("Cancel", variant="stop", scale=1, elem_id="finetune-cancel")
        state = gr.Markdown(elem_id="finetune-state")
        with gr.Row(equal_height=False):
            # Typed empty columns from the start: the plot then reads loss as a number (not a category) later.
            loss = gr.LinePlot(loss_table([]), x="step", y="loss", label="Training loss", height=260, scale=1,
                               elem_id="finetune-loss")
            grid = gr.Image(label="Latest validation samples", type="filepath", interactive=False, format="png",
                            elem_classes="pixelated", scale=1, elem_id="finetune-grid")
        with gr.Accordion("Share the model", open=False):
            with gr.Row():
                download = gr.Button("Zip the model", scale=1)
                zipped = gr.File(label="Download", scale=3, elem_id="finetune-zip")
            gr.Markdown("Or push it to the Hugging Face Hub as a model repository (a write token from "
                        "huggingface.co/settings/tokens; it is used for this push only and not stored).",
                        elem_classes="small-note")
            with gr.Row():
                repo = gr.Textbox(label="Repository (owner/name)", max_lines=1, scale=2)
                token = gr.Textbox(label="Token", type="password", max_lines=1, scale=2)
                push = gr.Button("Push to the Hub", scale=1)
            pushed = gr.Markdown()
        seen = gr.State({})  # what this tab last showed: the run, its state, its points and grid
        timer = gr.Timer(FINETUNE_POLL_S, active=False)

    def checked(upload_value, source_value: str, name: str, steps_value, selected: str, request: gr.Request):
        try:
            wanted = None if steps_value in (None, "") else steps_check.parse("steps", steps_value)
            found = jobs.check(raw_path(upload_value) or (source_value or ""), name or "", who_is(request), wanted,
                               base=folder_for(selected))
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from e
        return (found.summary() + "\n\nPress **Train** to start.", gr.update(choices=jobs.runs(), value=found.name))

    def started(name: str, request: gr.Request):
        try:
            said = jobs.start(name, who_is(request))
        except (ValueError, Busy) as e:  # Busy: who is training, and until when
            raise gr.Error(str(e), print_exception=False) from e
        return said, gr.Timer(active=True)

    def cancelled():
        return jobs.cancel()

    def poll(name: str, last: dict):
        """The run's progress for this tab; a run seen finishing is loaded and offered by the Model selector."""
        if not name:
            return gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), last, gr.Timer(active=False)
        try:
            st = jobs.status(name)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from e
        shown = {"run": name, "state": st.state, "points": len(st.losses), "grid": st.grid}
        new_run = last.get("run") != name
        plot = gr.update(value=loss_table(st.losses)) \
            if new_run or last.get("points") != shown["points"] else gr.update()
        picture = st.grid if new_run or last.get("grid") != st.grid else gr.update()
        offered = gr.update()
        message = st.message
        if st.state == "finished" and (new_run or last.get("state") != "finished"):
            offered = add_model(name, str(jobs.pipeline(name)))
            message += f" The model **{offered['value']}** is in the Model selector (above), selected: try a prompt."
        button = gr.update(value="Resume" if st.state in ("stopped", "failed") else "Train",
                           interactive=st.state in ("checked", "stopped", "failed"))
        return message, plot, picture, button, offered, shown, gr.Timer(active=st.state == "running")

    def opened():
        """A page opened while a run trains follows it; the runs are as they are now."""
        running = jobs.running()
        return gr.update(choices=jobs.runs(), value=running), gr.Timer(active=running is not None)

    def zip_model(name: str):
        try:
            return str(jobs.zip_pipeline(name))
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from e

    def push_model(name: str, repo_id: str, token_value: str):
        return jobs.push(name, repo_id or "", token_value or "")

    quiet = {"api_visibility": "private", "preprocess": False, "concurrency_id": "finetune",
             "concurrency_limit": 4, "show_progress": "hidden"}
    shown_outputs = [state, loss, grid, start, model, seen, timer]
    check.click(checked, [upload, source, run_name, steps, model], [report, run], **{**quiet, "show_progress": "full"}
                ).success(poll, [run, seen], shown_outputs, **quiet)
    start.click(started, [run], [state, timer], **quiet).success(poll, [run, seen], shown_outputs, **quiet)
    cancel.click(cancelled, None, state, **quiet).then(poll, [run, seen], shown_outputs, **quiet)
    gr.on([run.input, timer.tick], poll, [run, seen], shown_outputs, **quiet)
    download.click(zip_model, [run], zipped, **quiet)
    demo.load(opened, None, [run, timer], **quiet)
    push.click(push_model, [run, repo, token], pushed, **quiet)


# -- the app --------------------------------------------------------------------------------------
def build_demo(models: TextToImagePipeline | dict[str, TextToImagePipeline],
               settings: Settings | None = None, jobs: FineTuneJobs | None = None) -> gr.Blocks:
    """The Blocks over one loaded pipeline, or several by name: a model selector picks which one draws (the
    first is the default), and the examples, 'What this model knows' and the model card follow it. With
    `jobs`, a Fine-tune tab trains the selected model on someone's pictures and adds the result to the selector.
    Launch it yourself, as main() does (theme=THEME, css=CSS, and launch_options(settings) for the MCP server
    and the session capacity)."""
    settings = settings or Settings.from_env()
    models = dict(models) if isinstance(models, dict) else {"default": models}  # grows: a fine-tune adds to it
    if not models:
        raise ValueError("build_demo needs at least one model.")
    names = list(models)  # the models at start-up (the API's documented choices)
    limits = functools.partial(with_limits, checks={**CHECKS, "model": Choice(tuple(names))})

    def pipe_for(model: str) -> TextToImagePipeline:
        """The model a request names ("" or None: the default), or an error listing the served ones."""
        try:
            return models[Choice(tuple(models)).parse("model", model or names[0])]
        except InvalidInput as e:
            raise gr.Error(str(e), print_exception=False) from e

    def examples_for(model: str) -> list[str]:
        if model not in examples:
            p = models[model]
            examples[model] = example_prompts(p.captions, p.layout_grammar, max_chars=MAX_PROMPT_CHARS)
        return examples[model]

    def add_model(name: str, folder: str) -> dict:
        """Offer a pipeline folder while the app runs (a finished fine-tune), loaded once; the selector's update
        with it selected. A name a served model has already gets ' (fine-tune)'."""
        with adding:
            if folder not in added:
                key = name if name not in models else f"{name} (fine-tune)"
                models[key], added[folder] = load_pipeline(folder), key
        return gr.update(choices=list(models), value=added[folder], visible=True)

    added: dict[str, str] = {}  # pipeline folder → its name in the selector
    adding = threading.Lock()
    for run_name in jobs.runs() if jobs else []:  # finished runs kept from before a restart
        if jobs.pipeline(run_name) is not None:
            add_model(run_name, str(jobs.pipeline(run_name)))

    budget = MapsBudget(settings.maps_budget_mb * 2**20, _COMPUTE)
    pipe = models[names[0]]
    cross_layers = [n for n, b in pipe.unet.attention_layers.items() if b.kind == "cross"]
    n_heads = min(pipe.unet.attention_layers[n].num_heads for n in cross_layers)
    examples: dict[str, list[str]] = {}  # each model's example prompts, made when first asked for

    with gr.Blocks(title="Look Inside Diffusion", delete_cache=CacheKeeper.delete_cache(settings)) as demo:
        cache = CacheKeeper(demo.GRADIO_CACHE, settings)
        # The last GenerationResult of this session (the explorer re-renders from it); its maps are released
        # session_ttl_s after the run, when the tab closes (end_session below) or when the budget needs them.
        result = gr.State(None, time_to_live=settings.session_ttl_s, delete_callback=budget.release)
        gr.Markdown("# Look Inside Diffusion", elem_id="title")
        gr.Markdown("A small text-to-image diffusion model you can look inside: type a prompt, then see "
                    "where every word looked, per layer, timestep and head, and where every pixel looked.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", placeholder=placeholder_for(examples_for(names[0])),
                                        max_lines=2, scale=5, autofocus=True, elem_id="prompt",
                                        info=f"Emphasis: (word:1.5) strengthens a word's cross-attention, "
                                             f"(word:0.5) weakens it (weights 0–{MAX_WEIGHT:g}).")
                    run = gr.Button("Generate", variant="primary", scale=1, min_width=110)
                model = gr.Dropdown(list(models), value=names[0], label="Model", visible=len(models) > 1,
                                    elem_id="model", info="Each model knows its own words: see its examples and "
                                                          "'What this model knows'.")
                # The selected model's examples (a Dataset its selection refills: models come and go at run time)
                example_rows = gr.Dataset(components=[prompt], samples=[[e] for e in examples_for(names[0])],
                                          label="Examples", visible=bool(examples_for(names[0])), elem_id="examples")
                no_examples = gr.Markdown(NO_EXAMPLES, visible=not examples_for(names[0]), elem_classes="small-note")
                with gr.Accordion("Advanced settings", open=False):
                    negative_prompt = gr.Textbox("", label="Negative prompt", max_lines=2,
                                                 info="Replaces the empty prompt of classifier-free guidance; "
                                                      "its maps are in the explorer.")
                    with gr.Row():
                        steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                        guidance = gr.Slider(0, MAX_GUIDANCE, value=4.0, step=0.5, label="Guidance scale")
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                        randomize = gr.Checkbox(True, label="Randomize seed")
                    with gr.Row():
                        sampler = gr.Dropdown(sorted(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
                        num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images")
                    relation_guidance = gr.Slider(0, MAX_RELATION_GUIDANCE, value=RELATION_GUIDANCE, step=5,
                                                  label="Relation guidance", info=RELATION_INFO + layout_off(pipe))
                    object_guidance = gr.Slider(0, MAX_OBJECT_GUIDANCE, value=OBJECT_GUIDANCE, step=5,
                                                label="Object guidance", info=OBJECT_INFO + layout_off(pipe))
                with gr.Accordion("What this model knows", open=False):
                    knows = gr.Markdown(vocabulary.knows_note(pipe.captions, pipe.whole_words, pipe.layout_grammar))
                with gr.Accordion("Model card", open=False):
                    card = gr.Markdown(vocabulary.model_card_text(pipe.model_card))
            with gr.Column(scale=6):
                gallery = gr.Gallery(label="Samples", columns=2, height=SAMPLES_WIDTH + 40,
                                     format="png", object_fit="contain", allow_preview=False,
                                     elem_classes="pixelated", elem_id="samples")
                status = gr.Markdown("", label="Status", elem_id="status")

        gr.Markdown("## Attention explorer")
        placeholder = gr.Markdown("*Generate images to explore their attention maps.*")
        with gr.Column(visible=False) as explorer:
            with gr.Row():
                image = gr.Dropdown([(f"image {i + 1}", i) for i in range(MAX_IMAGES)], value=0, label="Image")
                layer = gr.Dropdown([("all layers (mean)", ALL_LAYERS)] + [(n, n) for n in cross_layers],
                                    value=ALL_LAYERS, label="Cross-attention layer")
                head = gr.Dropdown([("mean of heads", MEAN_HEADS)] + [(f"head {h + 1}", h) for h in range(n_heads)],
                                   value=MEAN_HEADS, label="Head")
                time_bin = gr.Slider(0, TIME_BINS, value=0, step=1, label="Timestep bin")
            with gr.Row():
                normalization = gr.Radio([(label, value) for value, label in NORMALIZATION_LABELS.items()],
                                         value="minmax", label="Normalisation", scale=3)
                with gr.Column(scale=2, min_width=200):
                    special = gr.Checkbox(False, label="Show start/end tokens",
                                          info="CLIP's start token soaks up most attention")
                    negative = gr.Checkbox(False, label="Negative prompt's maps")
                alpha = gr.Slider(0, 1, value=0.6, step=0.05, label="Overlay alpha", scale=2)
            note = gr.Markdown(label="Shown")
            with gr.Tabs():
                with gr.Tab("Words"):
                    words = maps_gallery("Where each word looked", 5, elem_id="word-maps")
                    words_note = gr.Markdown(vocabulary.word_maps_note(pipe.layout_grammar), elem_classes="small-note")
                with gr.Tab("Heads of one word"):
                    word = gr.Dropdown([], value="", label="Word", allow_custom_value=True,
                                       info="Words change with the prompt, the negative-prompt and start/end toggles")
                    heads = maps_gallery("Each attention head", 4)
                with gr.Tab("Layers × words"):
                    grid = gr.Image(label="Layer × word grid", format="png",
                                    interactive=False, elem_classes="pixelated", buttons=["download", "fullscreen"])
                with gr.Tab("Self-attention"):
                    gr.Markdown("Click a pixel of the sample to see which positions it attended to in each "
                                "self-attention layer (the timestep bin and alpha above apply). Self-attention "
                                "is recorded at the middle step of each bin (all steps: their mean), as "
                                "recording it at every step would slow sampling by a quarter.")
                    with gr.Row():
                        with gr.Column(scale=2, min_width=260):
                            target = gr.Image(label="Click a pixel", format="png", interactive=False,
                                              elem_classes="pixelated", elem_id="self-target")
                            with gr.Row():
                                pixel_y = gr.Number(0, label="Pixel y (row)", precision=0, minimum=0)
                                pixel_x = gr.Number(0, label="Pixel x (column)", precision=0, minimum=0)
                        self_maps = maps_gallery("Where that pixel looked", 4, scale=5)
                with gr.Tab("Export"):
                    gr.Markdown("A zip of the last run: `maps.json` (prompts, tokens, layers, bins), `maps.npz` "
                                "(per-layer, per-bin cross-attention maps and per-word maps of every image, "
                                "float16) and an overlay PNG per image and word.")
                    export_self = gr.Checkbox(False, label="Include self-attention maps",
                                              info="Each layer's position × position maps: about 10× the size")
                    export = gr.Button("Export maps (zip)")
                    download = gr.File(label="Download")
        # word_maps has no UI of its own: its outputs are hidden, and only API clients and agents call it.
        with gr.Column(visible=False):
            agent_run = gr.Button("word maps")
            agent_sample, agent_strip = gr.Image(format="png"), gr.Image(format="png")
            agent_words = gr.JSON()

        # The API's handlers: their parameter names are the API's, their docstrings its (and MCP's) descriptions.
        @session_tool
        @limits
        def generate_images(prompt: str, negative_prompt: str, steps: int, guidance: float, seed: int,
                            randomize_seed: bool, sampler: str, num_images: int, relation_guidance: float,
                            object_guidance: float, model: str = names[0], request: gr.Request = None,
                            progress=gr.Progress()):  # noqa: B008 (Gradio injects both)
            """Generate images from a text prompt with a small text-to-image diffusion model, recording where each
            word looked. The maps stay in this session for attention, self_attention and export_maps (not over
            MCP: use word_maps).

            Args:
                prompt: what to draw, in words the model knows, e.g. "a red circle above a blue square"; (word:1.5)
                    strengthens a word; {prompt}.
                negative_prompt: what to steer away from, "" for nothing; {negative_prompt}.
                steps: denoising steps, 20 is a good start; {steps}.
                guidance: classifier-free guidance scale, 4 is a good start; {guidance}.
                seed: the random seed; image i uses seed + i; {seed}.
                randomize_seed: pick a random seed instead (the seed used is returned); {randomize_seed}.
                sampler: the sampling method; {sampler}.
                num_images: how many images; {num_images}.
                relation_guidance: in "A above B" or "A to the left of B", how hard to nudge A's words above (left
                    of) B's; {relation_guidance}.
                object_guidance: in "A and B", how hard to nudge every object's words to be looked at
                    somewhere; {object_guidance}.
                model: which of the served models draws; {model}.

            Returns:
                the samples (256-pixel PNGs captioned with their seeds), the seed used, and a status line.
            """
            gallery, seed, status, run = generate(pipe_for(model), prompt, negative_prompt, steps, guidance, seed,
                                                  randomize_seed, sampler, num_images, relation_guidance,
                                                  object_guidance, progress=progress)
            cache.sweep()
            if over_mcp(request):
                return gallery, seed, f"{status}\n\n{MCP_NOTE}", None
            budget.hold(run)
            return gallery, seed, status, run

        @session_tool
        @on_torch_thread
        @validated
        @with_limits
        def export_maps(result: GenerationResult, self_attention: bool = False) -> str:
            """A zip of the maps of this session's last generate run: maps.json (prompts, tokens, layers, timestep
            bins), maps.npz (per-layer, per-bin cross-attention and per-word maps of every image, float16) and an
            overlay PNG per image and word. Call generate first, in the same session.

            Args:
                self_attention: also include each self-attention layer's position × position maps (about 10× the
                    size).

            Returns:
                the zip file.
            """
            return cache.export(result, self_attention)

        @limits
        def word_maps(prompt: str, negative_prompt: str, steps: int, guidance: float, seed: int, sampler: str,
                      model: str = names[0]):
            """Generate one image from a text prompt and tell where each of its words looked, in one call with no
            session: the sample, a strip of one heat-map overlay per word, and per word its share of the
            attention, the pixel it looked at most, the attention's centre (row, column) and its region of a
            3 × 3 grid ("top left" … "bottom right").

            Args:
                prompt: what to draw, in words the model knows, e.g. "a red circle above a blue square"; {prompt}.
                negative_prompt: what to steer away from, "" for nothing; {negative_prompt}.
                steps: denoising steps, 20 is a good start; {steps}.
                guidance: classifier-free guidance scale, 4 is a good start; {guidance}.
                seed: the random seed; {seed}.
                sampler: the sampling method; {sampler}.
                model: which of the served models draws; {model}.

            Returns:
                the sample (a 256-pixel PNG), the word overlays, and the words' maps as numbers (JSON).
            """
            return word_maps_report(pipe_for(model), prompt, negative_prompt, steps, guidance, seed, sampler)

        def select_model(model: str) -> list:
            """Show the chosen model's examples, words and card, and what layout guidance does for it."""
            chosen = pipe_for(model)
            rows = examples_for(model)
            return [gr.update(samples=[[e] for e in rows], visible=bool(rows)), gr.update(visible=not rows),
                    vocabulary.knows_note(chosen.captions, chosen.whole_words, chosen.layout_grammar),
                    vocabulary.model_card_text(chosen.model_card), gr.update(placeholder=placeholder_for(rows)),
                    gr.update(info=RELATION_INFO + layout_off(chosen)),
                    gr.update(info=OBJECT_INFO + layout_off(chosen)), vocabulary.word_maps_note(chosen.layout_grammar)]

        def use_example(model: str, index) -> str:
            """The example clicked (the Dataset sends its index) of the selected model."""
            try:
                rows = examples_for(Choice(tuple(models)).parse("model", model or names[0]))
                if not rows:
                    raise InvalidInput("this model has no examples")
                return rows[Whole(0, len(rows) - 1).parse("example", index)]
            except InvalidInput as e:
                raise gr.Error(str(e), print_exception=False) from e

        def served_models() -> dict:
            """The selector as it is now (a page opened before a fine-tune finished learns of its model)."""
            return gr.update(choices=list(models), visible=len(models) > 1)

        @validated
        def center_pixel(result: GenerationResult) -> tuple[int, int]:
            H, W = result.attention.image_size
            return H // 2, W // 2

        def end_session(request: gr.Request) -> None:
            """A closed tab releases its session's maps now (Gradio keeps a closed session's State an hour)."""
            demo.state_holder.delete_state(request.session_hash)

        gen_inputs = [prompt, negative_prompt, steps, guidance, seed, randomize, sampler, num_images, relation_guidance,
                      object_guidance, model]
        attention_inputs = [result, image, layer, time_bin, head, normalization, special, negative, alpha, word]
        attention_outputs = [words, word, heads, grid, note]
        self_inputs = [result, image, time_bin, pixel_y, pixel_x, alpha]
        # Every event takes its inputs as sent (preprocess=False): validated checks them, for the browser and
        # for API clients alike (see CHECKS).
        raw = {"preprocess": False}

        # Check first, in a step with no outputs: a bad request only raises a toast and the last samples
        # stay on screen (an error in generate itself blanks the gallery). generate() checks again for
        # API callers, who skip this step. Queued (unqueued errors show no toast), in its own group.
        checked = gr.on([prompt.submit, run.click], check_generate, gen_inputs, None, api_visibility="private",
                        concurrency_id="checks", concurrency_limit=4, show_progress="hidden", **raw)
        generated = checked.success(generate_images, gen_inputs, [gallery, seed, status, result], api_name="generate",
                                    concurrency_id="sampling", **raw)
        word_inputs = [result, image, special, negative, word]
        explorer_controls = [gallery, explorer, placeholder, image, layer, head, time_bin]
        after = generated.success(explorer_choices, [result], explorer_controls, api_visibility="private", **raw)
        after = after.success(center_pixel, [result], [pixel_y, pixel_x], api_visibility="private", **raw)
        after = after.success(word_choices, word_inputs, word, api_visibility="private", **raw)
        after.success(render_attention, attention_inputs, attention_outputs, api_visibility="private", **raw)
        after.success(render_self_attention, self_inputs, [target, self_maps], api_visibility="private", **raw)

        # The explorer never samples: its events run in their own group, so they don't wait behind
        # another user's sampling run (a re-render takes well under a second at 32 px).
        light = {"concurrency_id": "explorer", "concurrency_limit": 2, "show_progress": "minimal", **raw}
        private = {"api_visibility": "private", **light}
        # Controls that change which words there are refresh the word selector first.
        picked = gallery.select(gallery_index, None, image, **private)
        toggled = gr.on([image.input, special.input, negative.input], word_choices, word_inputs, word, **private)
        for changed in [picked.success(word_choices, word_inputs, word, **private), toggled]:
            changed.success(render_attention, attention_inputs, attention_outputs, **private)
        picked.success(render_self_attention, self_inputs, [target, self_maps], **private)
        gr.on([c.input for c in (layer, time_bin, head, normalization, alpha, word)],
              render_attention, attention_inputs, attention_outputs, api_name="attention", **light)
        gr.on([image.input, time_bin.input, alpha.input, pixel_y.submit, pixel_x.submit],
              render_self_attention, self_inputs, [target, self_maps], api_name="self_attention", **light)
        target.select(click_pixel, [result, image], [pixel_y, pixel_x], **private).success(
            render_self_attention, self_inputs, [target, self_maps], **private)
        export.click(export_maps, [result, export_self], download, api_name="export_maps", **light)
        model.change(select_model, [model], [example_rows, no_examples, knows, card, prompt, relation_guidance,
                                             object_guidance, words_note], **private)
        example_rows.click(use_example, [model, example_rows], prompt, **private)
        demo.load(served_models, None, model, **private)
        # Below the explorer, a section of its own: compare two models or two prompts, and teach a model new words.
        gr.Markdown("## Compare" + (" and fine-tune" if jobs is not None else ""), elem_id="more")
        with gr.Tabs():
            build_compare_tab(pipe_for, lambda: list(models), budget, cache, settings)
            if jobs is not None:
                build_finetune_tab(demo, jobs, model, add_model, lambda name: models[name].folder if name in models
                                   else None)
        agent_run.click(word_maps, [prompt, negative_prompt, steps, guidance, seed, sampler, model],
                        [agent_sample, agent_strip, agent_words], api_name="word_maps", concurrency_id="sampling",
                        **raw)
        demo.unload(end_session)
    demo.maps_budget, demo.cache_keeper = budget, cache  # for monitoring and tests

    # One sampling run at a time on 2 vCPUs; max_size bounds how many wait (one more is told the queue is full,
    # and everyone waiting sees their place and the expected wait: Gradio's status over the outputs).
    demo.queue(default_concurrency_limit=1, max_size=settings.queue_size)
    return demo


def launch_options(settings: Settings) -> dict:
    """Blocks.launch arguments that come from the settings."""
    return {"mcp_server": settings.mcp, "state_session_capacity": settings.max_sessions}


@on_torch_thread
def load_pipeline(model: str, dtype: str = "auto") -> TextToImagePipeline:
    """A pipeline folder, or a hub id (downloaded once; offline it must already be cached)."""
    if Path(model).is_dir():
        return TextToImagePipeline.from_pretrained(model, dtype=dtype)
    from huggingface_hub import snapshot_download  # only needed for hub ids

    return TextToImagePipeline.from_pretrained(snapshot_download(model), dtype=dtype)


def shipped_models(root: Path = Path("weights")) -> list[str]:
    """The model folders in weights/ (those with a trained unet/), weights/default first."""
    return [str(p) for p in model_folders(root)] or [DEFAULT_MODEL]


def model_names(sources: list[str]) -> dict[str, str]:
    """A short name for each model the selector offers: the folder's name ("clipart" for weights/clipart, "f100"
    for runs/f100/pipeline) or the hub id; where two would share a name, what was given."""
    def short(source: str) -> str:
        path = Path(source)
        if not path.exists():
            return source
        return path.parent.name if path.name == "pipeline" and path.parent.name else path.name

    names = [short(s) for s in sources]
    return {(n if names.count(n) == 1 else s): s for n, s in zip(names, sources, strict=True)}


@on_torch_thread
def warm_up(pipe: TextToImagePipeline) -> None:
    pipe("a red circle", num_images=4, steps=2, seed=0, record_attention=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None,
                        help="pipeline folder or hub id; repeat it to offer several (the first is the default). "
                             "Default: every model shipped in weights/, weights/default first")
    parser.add_argument("--host", default=None, help="address to bind, e.g. 0.0.0.0 (default: Gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free)")
    parser.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="U-Net compute type; auto = bf16 where this CPU runs it fast, else fp32 (default: auto)")
    parser.add_argument("--finetune-dir", default=FINETUNE_ROOT,
                        help="where the Fine-tune tab's runs go (default: %(default)s)")
    add_settings_flags(parser, Settings.from_env())
    args = parser.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})

    sources = args.model or shipped_models()
    for source in sources:
        looks_local = Path(source).exists() or source.startswith((".", "/", "~")) or source == DEFAULT_MODEL
        # weights/default ships the text encoder first; its U-Net arrives once trained.
        if looks_local and not (Path(source) / "unet").is_dir():
            sys.exit(
                f"No trained model at {source!r} (no unet/ in it). Train one and point the app at its export:\n"
                f"    python train.py --data shapes --caption-column captions --out runs/default --steps 8000\n"
                f"    python app.py --model runs/default/pipeline\n"
                f"or serve a model from the Hugging Face Hub: python app.py --model OWNER/NAME"
            )
    models = {}
    for name, source in model_names(sources).items():
        try:
            models[name] = load_pipeline(source, args.dtype)
        except Exception as e:  # a CLI: one clear line beats a traceback through three libraries
            sys.exit(f"Could not load the model {source!r}: {e}")
    jobs = finetune_jobs(settings, sources[0], args.finetune_dir)
    THREADS.cores, THREADS.jobs = os.cpu_count() or 1, jobs  # every core, less a running fine-tune's
    _COMPUTE.submit(THREADS.fit).result()
    # The first sampling run builds the CPU kernels for its shapes (~1.5 s here). Do that for the default
    # settings while Gradio builds and starts the server: queued on the torch thread, the first request
    # waits for it (the default model's first, then the others').
    for pipe in models.values():
        _COMPUTE.submit(warm_up, pipe)
    build_demo(models, settings, jobs).launch(server_name=args.host, server_port=args.port, share=args.share,
                                            theme=THEME, css=CSS, allowed_paths=[args.finetune_dir],
                                            **launch_options(settings))


def finetune_jobs(settings: Settings, base: str, root: str = FINETUNE_ROOT) -> FineTuneJobs | None:
    """The Fine-tune tab's jobs over the first model (a local folder: train.py --init reads it), or None (off, or
    a hub model)."""
    if not settings.finetune or not (Path(base) / "unet").is_dir():
        return None
    jobs = FineTuneJobs(root, base, threads=settings.finetune_threads, keep_runs=settings.finetune_keep_runs,
                        max_upload_mb=settings.finetune_upload_mb, allow_local=settings.finetune_local_data)
    return jobs


if __name__ == "__main__":
    main()
