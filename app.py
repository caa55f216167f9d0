"""Gradio app: type a prompt, get samples, and see where every word (and every pixel) looked.

    python app.py                                  # serves weights/default (and an MCP server)
    python app.py --model runs/default/pipeline    # any pipeline folder written by train.py
    python app.py --model owner/name --port 7861   # a hub id (downloaded once, then cached)

The UI is wiring only: sampling and attention recording live in `diffusion.pipeline`, map
aggregation and overlays in `diffusion.maps`, and what the loaded model knows (its example prompts, its
words, the prompt words it never saw, whether layout guidance reads its prompts) in `diffusion.vocabulary`,
from the model's own tokenizer and caption summary: nothing here assumes a vocabulary. `build_demo(pipe)`
returns the Blocks; the model is loaded once, in `main()`, and nothing heavy happens at import time (as a
Space runs it).

Named API endpoints (gradio_client): `generate` (samples + seed), then, in the same client session,
`attention` (per-word overlays, per-head maps of one word, the layer × word grid), `self_attention` (where one
pixel looked, per self-attention layer) and `export_maps` (a zip of PNG + npz + JSON); `word_maps` does it in one
call (a sample, its word overlays and where each word looked, as numbers), for agents and scripts that keep no
session: it is the MCP tool at /gradio_api/mcp/ (see "agents" below).

A public Space runs for weeks, for strangers and their scripts: every parameter is checked in one place
(`validated`, with the limits of diffusion/limits.py) and a bad one gets an error naming it and what is
allowed; Gradio's cache, the exports and the sessions' maps are bounded (`Settings`: environment variables
or flags).
"""

import argparse
import contextvars
import functools
import inspect
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, ImageDraw, ImageFont

from diffusion.grammar import NAME as SHAPES_GRAMMAR
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
from diffusion.maps import AttentionMaps, display_size, normalize_maps, overlay
from diffusion.pipeline import GenerationResult, TextToImagePipeline
from diffusion.prompts import MAX_WEIGHT
from diffusion.sampling import DEFAULT_SAMPLER, SAMPLERS
from diffusion.vocabulary import CAPTIONS_FILE, example_prompts, layout_off_note

DEFAULT_MODEL = "weights/default"
log = logging.getLogger(__name__)

DISPLAY = 256  # samples are 16–32 px: shown nearest-upscaled to this many pixels on the longer side
GRID_CELL = 96  # one cell of the layer × word grid
SAMPLES_WIDTH = 640  # about the samples gallery's width on a laptop screen, for its height
ALL_LAYERS = "all"
TIME_BINS = 4  # the explorer's timestep bins (fewer when a run has fewer steps)
MEAN_HEADS = -1

KNOWN_WORDS_SHOWN = 60  # "What this model knows": the most used caption words listed …
WHOLE_WORDS_SHOWN = 400  # … or, for a model without a caption summary, its tokenizer's whole words
FUNCTION_WORDS = {"a", "an", "the", "of", "to", "on", "in", "at", "and", "<start>", "<end>"}
NORMALIZATIONS = [
    ("per word (min–max)", "minmax"),
    ("absolute (compare words)", "absolute"),
    ("share per pixel (which word wins)", "tokens"),
]
NORMALIZATION_LABELS = {value: label for label, value in NORMALIZATIONS}

# How to read the word maps. Models of the shapes grammar were trained with a grounding loss on their colour,
# shape and size words (diffusion/grounding.py and weights/default/README.md); other models' words were not.
GROUNDED_WORDS_NOTE = (
    "How to read these: the shipped model was trained to point its colour, shape and size words at their "
    "objects (a grounding loss; see the model card). Other words (*a*, *two*, *above*, *on*, *background*) "
    "were not. Each word's vector also carries the rest of the prompt (CLIP reads left to right, and the "
    "U-Net's context layer mixes the whole prompt), so an ungrounded word often lights up an object named "
    "near it."
)
WORDS_NOTE = (
    "How to read these: each word's vector carries the rest of the prompt too (CLIP reads left to right, and the "
    "U-Net's context layers, where it has them, mix the whole prompt), so a word often lights up an object named "
    "near it."
)

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


def on_torch_thread(fn):
    """Run `fn` on the app's one torch thread and wait for it. Gradio's context goes along, so progress
    bars and warnings still reach their event; a call from that thread itself runs directly."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread().name.startswith(_TORCH_THREAD):
            return fn(*args, **kwargs)
        return _COMPUTE.submit(contextvars.copy_context().run, fn, *args, **kwargs).result()

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
}
# Bounds that follow the session's last run (its images, timestep bins, layers, heads and size): made per call
# from its maps and the values checked before them (a layer's head count).
RUN_CHECKS: dict[str, Callable[[AttentionMaps, dict], Check]] = {
    "image": lambda maps, _: Whole(0, maps.num_images - 1, " (0 is the first image)"),
    "layer": lambda maps, _: Choice((ALL_LAYERS, *maps.layers("cross"))),
    "time_bin": lambda maps, _: Whole(0, len(maps.bins), " (0: all steps)"),
    "head": lambda maps, values: Whole(MEAN_HEADS, max_heads(maps, values.get("layer", ALL_LAYERS)) - 1,
                                       f" ({MEAN_HEADS}: the mean of heads)"),
    "pixel_y": lambda maps, _: Whole(0, maps.image_size[0] - 1, f" (a row of the {maps.image_size[0]}-pixel image)"),
    "pixel_x": lambda maps, _: Whole(0, maps.image_size[1] - 1, f" (a column of the {maps.image_size[1]}-pixel "
                                                                 "image)"),
}
RUN = "result"  # the session's last GenerationResult: a handler that reads it needs its maps
TRUSTED = {"pipe", "progress", "evt"}  # set by the app or by Gradio, never by a client
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


# -- bounded disk and memory ----------------------------------------------------------------------
ENV_PREFIX = "APP_"


def setting(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class Settings:
    """What keeps a long-running public server bounded. Each field comes from the environment variable
    APP_<FIELD> (e.g. APP_CACHE_TTL_S=600) or from main()'s flag (--cache-ttl-s 600); these are the defaults."""

    cache_ttl_s: int = setting(1800, "files Gradio serves (samples, overlays, export zips) are deleted this many "
                                     "seconds after they were written (Gradio's delete_cache, run every 5 min)")
    max_exports: int = setting(20, "export zips kept at once; the oldest goes first")
    session_ttl_s: int = setting(1800, "a session's maps are released this many seconds after its last generate "
                                       "(at once when its tab closes)")
    maps_budget_mb: int = setting(1024, "MB of maps all sessions hold together; past it the oldest run's go")
    max_sessions: int = setting(1000, "sessions Gradio remembers at once; the oldest is forgotten")
    queue_size: int = setting(32, "requests that may wait in the queue; one more is told the queue is full")
    mcp: bool = setting(True, "also serve the endpoints as MCP tools at /gradio_api/mcp/")

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "Settings":
        """Defaults overridden by APP_* variables; a malformed one is an error that names it."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in environ:
                values[f.name] = parse_setting(key, environ[key], f.type)
        return cls(**values)

    def __post_init__(self):
        for f in fields(self):
            if f.type in (int, "int") and getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be at least 1, got {getattr(self, f.name)}.")


def parse_setting(key: str, text: str, kind) -> int | bool:
    """An APP_* variable's text as an int, or a bool (1/0, true/false, yes/no)."""
    if kind in (bool, "bool"):
        if text.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{key}={text!r}: use 1 or 0 (true/false).")
        return text.strip().lower() in ("1", "true", "yes")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a whole number.") from None


class MapsBudget:
    """The attention maps of every session's last run, held under one byte budget.

    A run's maps take 33 MB for 4 images and 66 MB for 8 (the shipped model: per-layer, per-bin sums, and
    self-attention's (N, N) maps), and Gradio keeps a session's State until its time_to_live, or an hour after
    its tab closes. Past the budget, the oldest run's maps are released (its explorer then asks for a new run),
    so memory stays bounded however many sessions are open. Maps change only on the torch thread, where the
    explorer reads them: a render never sees its maps vanish halfway.
    """

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self._held: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()  # id(result) -> (ref, bytes)
        self._lock = threading.Lock()  # the dict: a result garbage-collected on any thread removes itself

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._held.values())

    @on_torch_thread
    def hold(self, result: GenerationResult) -> None:
        """Count a new run's maps in, releasing the oldest runs' while over budget (never the newest)."""
        key = id(result)
        ref = weakref.ref(result, lambda _: self._forget(key))  # a session Gradio forgot: its maps are gone
        with self._lock:
            self._held[key] = (ref, result.attention.store.nbytes())
            while sum(n for _, n in self._held.values()) > self.limit and len(self._held) > 1:
                _, (old, _) = self._held.popitem(last=False)
                if (old_result := old()) is not None:
                    old_result.attention = None

    def release(self, result: GenerationResult | None) -> None:
        """Release a run's maps (its session ended or expired). Returns at once: Gradio calls this from its
        event loop, which must not wait for a sampling run on the torch thread."""
        if isinstance(result, GenerationResult):
            _COMPUTE.submit(self._release, result)

    def _release(self, result: GenerationResult) -> None:
        self._forget(id(result))
        result.attention = None

    def _forget(self, key: int) -> None:
        with self._lock:
            self._held.pop(key, None)


class CacheKeeper:
    """Gradio's cache folder, bounded. Gradio deletes the files it served once they are older than the TTL
    (delete_cache); this adds the export zips (written straight into the cache, so Gradio serves them without
    a copy, and at most max_exports of them) and the empty folders Gradio leaves (one per file it wrote)."""

    MAX_CHECK_INTERVAL_S = 300

    def __init__(self, root: str | Path, settings: Settings):
        self.root = Path(root)
        self.settings = settings
        self._last_sweep = 0.0

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    def export(self, result: GenerationResult, self_attention: bool) -> str:
        """Zip a run's maps (maps.json, maps.npz, overlay PNGs) into the cache; returns the zip's path."""
        self.exports.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=self.exports))
        with tempfile.TemporaryDirectory() as unzipped:  # only the zip stays
            result.attention.export(unzipped, result.images, size=DISPLAY, self_attention=self_attention)
            path = shutil.make_archive(str(folder / f"attention-maps-seed{result.seed}"), "zip", unzipped)
        self.prune_exports()
        return path

    def prune_exports(self) -> None:
        folders = sorted(self.exports.iterdir(), key=lambda p: p.stat().st_mtime) if self.exports.is_dir() else []
        for old in folders[:-self.settings.max_exports]:
            shutil.rmtree(old, ignore_errors=True)

    def sweep(self, force: bool = False) -> None:
        """Remove the empty folders older than the TTL (at most once per check interval, unless forced)."""
        now = time.time()
        if not force and now - self._last_sweep < self.delete_cache(self.settings)[0]:
            return
        self._last_sweep = now
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            try:
                if folder.is_dir() and now - folder.stat().st_mtime > self.settings.cache_ttl_s:
                    folder.rmdir()  # only succeeds when empty
            except OSError:
                continue

    @classmethod
    def delete_cache(cls, settings: Settings) -> tuple[int, int]:
        """Gradio's delete_cache: (how often to look, how old a file may get), in seconds."""
        return min(settings.cache_ttl_s, cls.MAX_CHECK_INTERVAL_S), settings.cache_ttl_s


def upscale(image: Image.Image, size: int = DISPLAY) -> Image.Image:
    return image.resize(display_size(image.size, size), Image.NEAREST)


def knows_note(pipe: TextToImagePipeline, limit: int = KNOWN_WORDS_SHOWN) -> str:
    """'What this model knows': the words its training captions used most, its tokenizer's whole words, and
    whether layout guidance reads its prompts."""
    summary, whole = pipe.captions, pipe.whole_words
    if summary is not None:
        shown = ", ".join(f"{w} ({n:,})" for w, n in summary.most_common(limit))
        more = len(summary.word_counts) - limit
        learned = (f"It was trained on **{summary.num_captions:,} captions** in **{len(summary.word_counts):,} "
                   f"different words**, and draws what they described. The words they used most (times used): "
                   f"{shown}{f', … and {more:,} more' if more > 0 else ''}.")
    else:
        more = len(whole) - WHOLE_WORDS_SHOWN
        shown = ", ".join(whole[:WHOLE_WORDS_SHOWN]) + (f", … and {more:,} more" if more > 0 else "")
        learned = (f"This model's folder has no summary of its training captions ({CAPTIONS_FILE}), so what they "
                   f"said is not known here; its tokenizer's whole words are the best guide: {shown}.")
    tokenizer = (f"Its tokenizer holds **{len(whole):,} whole words**; other words are split into pieces, and a "
                 f"warning lists the prompt words the model never learned.")
    off = layout_off_note(summary)
    layout = ("Layout guidance reads its prompts in the shapes grammar (relations, counts and places)."
              if pipe.layout_grammar == SHAPES_GRAMMAR else off[0].upper() + off[1:])
    return "\n\n".join([learned, tokenizer, layout])


RELATION_INFO = ("In 'A above B', 'A to the left of B' (or 'A over B', 'A at the top and B at the bottom' …), nudge "
                 "the first steps' noise so that A's words look above (left of) B's; 0 turns it off. Other prompts "
                 "are not touched.")
OBJECT_INFO = ("In 'A and B' (two objects or more, no relation), nudge the first steps' noise so that every object's "
               "words are looked at somewhere (Attend-and-Excite), so none is left out; in 'three X', so that X's "
               "words look at three places, not four. 0 turns it off. Other prompts are not touched.")


def layout_off(pipe: TextToImagePipeline) -> str:
    """' (why layout guidance does not read this model's prompts)' for the sliders' info, or ''."""
    return "" if pipe.layout_grammar == SHAPES_GRAMMAR else f" ({layout_off_note(pipe.captions)})"


def words_note_for(pipe: TextToImagePipeline) -> str:
    return GROUNDED_WORDS_NOTE if pipe.layout_grammar == SHAPES_GRAMMAR else WORDS_NOTE


def placeholder_for(examples: list[str]) -> str:
    return examples[0] if examples else "describe the image"


def model_card_text(pipe: TextToImagePipeline) -> str:
    card = pipe.model_card or "This model folder has no model card (README.md)."
    if card.startswith("---"):  # YAML front matter is for the Hub, not for readers
        card = card.split("---", 2)[-1]
    return card.strip()


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
    gallery = [(upscale(im), f"seed {s}") for im, s in zip(result.images, result.seeds, strict=True)]
    layout = layout_note(result, relation_guidance, object_guidance)
    status = (f"**Seed {result.seed}** (image *i* uses seed {result.seed} + *i* − 1) · {steps} {sampler} steps · "
              f"guidance {guidance:g}{layout} · {seconds:.1f} s. "
              "Click a sample to explore it below.")
    status += "".join(f"\n\n{note}" for note in result.guidance_notes)
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
    heads = [("mean of heads", MEAN_HEADS)] + [(f"head {h + 1}", h) for h in range(max_heads(maps, ALL_LAYERS))]
    bins = maps.bins
    bin_info = "0 = all steps · " + " · ".join(
        f"{b + 1}: {steps_label(r)}" for b, r in enumerate(bins)) + " (1 is the noisiest)"
    return (gr.update(columns=columns, height=height), gr.update(visible=True), gr.update(visible=False),
            gr.update(choices=images, value=0), gr.update(choices=layers, value=ALL_LAYERS),
            gr.update(choices=heads, value=MEAN_HEADS), gr.update(maximum=len(bins), value=0, info=bin_info))


def steps_label(steps: range) -> str:
    """Sampling steps, 1-based for people: "step 3" or "steps 1–5"."""
    return f"step {steps.start + 1}" if len(steps) == 1 else f"steps {steps.start + 1}–{steps.stop}"


def max_heads(maps: AttentionMaps, layer: str) -> int:
    """Heads a layer choice has; "all layers" averages head k over layers, so the smallest count."""
    names = maps.layers("cross") if layer == ALL_LAYERS else [layer]
    return min(maps.num_heads(n) for n in names)


def map_options(layer: str, time_bin: int, head: int) -> dict:
    """The explorer's choices (checked by validated) as AttentionMaps' arguments."""
    return {"layer": None if layer == ALL_LAYERS else layer,
            "bins": None if time_bin == 0 else [time_bin - 1],
            "head": None if head == MEAN_HEADS else head}


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
    maps = result.attention
    opts = map_options(layer, time_bin, head)
    sample = result.images[image]
    common = {"negative": negative, "include_special": special_tokens, "normalize": normalization}
    by_word = maps.word_maps(image, **opts, **common)
    words = list(by_word)
    if not words:
        note = ("The negative prompt is empty: its only tokens are the start/end tokens. Tick *start/end tokens* "
                "to see them, or set a negative prompt under *Advanced settings*." if negative else
                "This prompt has no word tokens to show; tick *start/end tokens*.")
        return [], None, [], None, note
    word = focus(words, word)
    gallery = [(overlay(sample, m, alpha, DISPLAY), w) for w, m in by_word.items()]

    # Per-head view of one word: each head on its own, normalised like the word maps.
    n_heads = max_heads(maps, layer)
    per_head = {f"head {h + 1}": maps.word_maps(image, **{**opts, "head": h}, **common)[word] for h in range(n_heads)}
    if normalization == "absolute":  # compare heads with each other rather than each with itself
        per_head = normalize_maps(per_head, "absolute")
    heads = [(overlay(sample, m, alpha, DISPLAY), name) for name, m in per_head.items()]

    grid = layer_word_grid(maps, sample, image, opts, common, alpha)
    which = "negative prompt" if negative else "prompt"
    shown = maps.bins[opts["bins"][0]] if opts["bins"] else None
    steps = "all steps" if shown is None else f"{steps_label(shown)} of {maps.store.num_steps}"
    where = "all layers" if opts["layer"] is None else f"{layer} ({'×'.join(map(str, maps.layer_size(layer)))})"
    heads_label = "mean of heads" if opts["head"] is None else f"head {opts['head'] + 1}"
    note = (f"Image {image + 1}, {which} words · {where} · {steps} · {heads_label} · "
            f"{NORMALIZATION_LABELS[normalization]}")
    return gallery, word, heads, grid, note


def focus(words: list[str], word: str | None) -> str | None:
    """The word of the per-head view: kept while the prompt has it, else the first content word."""
    if word in words or not words:
        return word if words else None
    return next((w for w in words if w not in FUNCTION_WORDS), words[0])


@validated
def word_choices(result: GenerationResult, image: int, special_tokens: bool, negative: bool, word: str) -> dict:
    """The word selector's choices for the words shown (they change with image, negative and start/end)."""
    # The keys of word_maps, so labels match ("a #2" for a repeated word); computing one map is cheap.
    words = list(result.attention.word_maps(image, negative=negative, include_special=special_tokens))
    return gr.update(choices=words, value=focus(words, word))


def layer_word_grid(maps: AttentionMaps, sample: Image.Image, image: int, opts: dict, common: dict,
                    alpha: float, all_layers_only: bool = False) -> Image.Image:
    """One picture: a row per cross-attention layer (plus all layers; or that row alone), a column per word."""
    rows = [(ALL_LAYERS, "all layers")] + ([] if all_layers_only else [
        (n, f"{n.removesuffix('.cross_attn')} {'x'.join(map(str, maps.layer_size(n)))}") for n in maps.layers("cross")])
    by_row = [maps.word_maps(image, **{**opts, "layer": None if n == ALL_LAYERS else n}, **common) for n, _ in rows]
    words = list(by_row[0])
    font = ImageFont.load_default(size=13)  # Pillow's bundled font: no "×" glyph, hence "16x16" above
    label_w, header_h, pad = 150, 24, 4
    cell = GRID_CELL + pad
    grid = Image.new("RGB", (label_w + cell * len(words), header_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, w in enumerate(words):
        draw.text((label_w + j * cell + GRID_CELL // 2, header_h // 2), w, fill="black", font=font, anchor="mm")
    for i, ((_, label), row_maps) in enumerate(zip(rows, by_row, strict=True)):
        y = header_h + i * cell
        draw.text((4, y + GRID_CELL // 2), label, fill="black", font=font, anchor="lm")
        for j, w in enumerate(words):
            grid.paste(overlay(sample, row_maps[w], alpha, GRID_CELL), (label_w + j * cell, y))
    return grid


def mark(image: Image.Image, pixel: tuple[int, int], source_size: tuple[int, int]) -> Image.Image:
    """Draw a ring around source pixel (y, x) on an upscaled copy."""
    H, W = source_size
    sy, sx = image.height / H, image.width / W
    cy, cx = (pixel[0] + 0.5) * sy, (pixel[1] + 0.5) * sx
    r = max(4.0, 0.7 * max(sx, sy))
    out = image.copy()
    draw = ImageDraw.Draw(out)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(0, 255, 255), width=2)
    return out


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
    maps = result.attention
    opts = map_options(ALL_LAYERS, time_bin, MEAN_HEADS)
    H, W = maps.image_size
    pixel = (pixel_y, pixel_x)
    sample = result.images[image]
    target = mark(upscale(sample), pixel, (H, W))
    layers = maps.layers("self")
    if not layers:
        return target, []
    per_layer = {n: maps.self_attention(image, n, pixel, opts["bins"], normalize="absolute") for n in layers}
    mean = normalize_maps({"mean": torch.stack(list(per_layer.values())).mean(0)}, "minmax")["mean"]
    bins = opts["bins"] if opts["bins"] is not None else range(maps.store.num_bins)
    steps = [s + 1 for b in bins for s in maps.store.self_attention_steps(b)]  # 1-based, as the UI counts
    when = f"step {steps[0]}" if len(steps) == 1 else "steps " + ", ".join(map(str, steps))
    items = [(f"all layers (mean) · {when}", mean)] + [
        (f"{n} · {'×'.join(map(str, maps.layer_size(n)))}", normalize_maps({n: m}, "minmax")[n])
        for n, m in per_layer.items()]
    gallery = [(mark(overlay(sample, m, alpha, DISPLAY), pixel, (H, W)), label) for label, m in items]
    return target, gallery


@validated
def click_pixel(result: GenerationResult, image: int, evt: gr.SelectData) -> tuple[int, int]:
    """A click on the upscaled sample (x, y in display pixels) → the sample's pixel (y, x)."""
    H, W = result.attention.image_size
    dw, dh = display_size((W, H), DISPLAY)
    x, y = evt.index
    return min(H - 1, int(y * H / dh)), min(W - 1, int(x * W / dw))


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
    maps, sample = result.attention, result.images[0]
    common = {"negative": False, "include_special": False, "normalize": "minmax"}
    strip = layer_word_grid(maps, sample, 0, map_options(ALL_LAYERS, 0, MEAN_HEADS), common, alpha=0.6,
                            all_layers_only=True)
    summary = {"prompt": prompt, "seed": seed, "steps": steps, "image_size": list(maps.image_size),
               "words": maps.word_summary(0), "warnings": result.warnings}
    return upscale(sample), strip, summary


def maps_gallery(label: str, columns: int, **kwargs) -> gr.Gallery:
    """A gallery of 256 px overlays: fixed columns (a 2-word prompt must not blow maps up), exact PNG pixels."""
    return gr.Gallery(label=label, columns=columns, fit_columns=False, height="auto", format="png",
                      object_fit="contain", elem_classes="pixelated", **kwargs)


# -- the app --------------------------------------------------------------------------------------
def build_demo(models: TextToImagePipeline | dict[str, TextToImagePipeline],
               settings: Settings | None = None) -> gr.Blocks:
    """The Blocks over one loaded pipeline, or several by name: a model selector picks which one draws (the
    first is the default), and the examples, 'What this model knows' and the model card follow it. Launch it
    yourself, as main() does (theme=THEME, css=CSS, and launch_options(settings) for the MCP server and the
    session capacity)."""
    settings = settings or Settings.from_env()
    models = models if isinstance(models, dict) else {"default": models}
    if not models:
        raise ValueError("build_demo needs at least one model.")
    names = list(models)
    model_check = Choice(tuple(names))
    limits = functools.partial(with_limits, checks={**CHECKS, "model": model_check})

    def pipe_for(model: str) -> TextToImagePipeline:
        """The model a request names ("" or None: the default), or an error listing the served ones."""
        try:
            return models[model_check.parse("model", model or names[0])]
        except InvalidInput as e:
            raise gr.Error(str(e), print_exception=False) from e

    budget = MapsBudget(settings.maps_budget_mb * 2**20)
    pipe = models[names[0]]
    cross_layers = [n for n, b in pipe.unet.attention_layers.items() if b.kind == "cross"]
    n_heads = min(pipe.unet.attention_layers[n].num_heads for n in cross_layers)
    examples = {name: example_prompts(p.captions, p.layout_grammar, max_chars=MAX_PROMPT_CHARS)
                for name, p in models.items()}

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
                    prompt = gr.Textbox(label="Prompt", placeholder=placeholder_for(examples[names[0]]),
                                        max_lines=2, scale=5, autofocus=True, elem_id="prompt",
                                        info=f"Emphasis: (word:1.5) strengthens a word's cross-attention, "
                                             f"(word:0.5) weakens it (weights 0–{MAX_WEIGHT:g}).")
                    run = gr.Button("Generate", variant="primary", scale=1, min_width=110)
                model = gr.Dropdown(names, value=names[0], label="Model", visible=len(names) > 1, elem_id="model",
                                    info="Each model knows its own words: see its examples and 'What this model "
                                         "knows'.")
                example_panels = []  # one per model; the selected model's is shown
                for name in names:
                    with gr.Column(visible=name == names[0]) as panel:
                        if examples[name]:
                            gr.Examples(examples[name], inputs=[prompt], cache_examples=False, label="Examples")
                        else:
                            gr.Markdown(f"No examples: this model's folder has no summary of its training captions "
                                        f"({CAPTIONS_FILE}). Describe an image in the words it was trained on; "
                                        f"'What this model knows' lists its tokenizer's words.",
                                        elem_classes="small-note")
                    example_panels.append(panel)
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
                about_panels = []  # each model's words and card
                for name, p in models.items():
                    with gr.Column(visible=name == names[0]) as panel:
                        with gr.Accordion("What this model knows", open=False):
                            gr.Markdown(knows_note(p))
                        with gr.Accordion("Model card", open=False):
                            gr.Markdown(model_card_text(p))
                    about_panels.append(panel)
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
                normalization = gr.Radio(NORMALIZATIONS, value="minmax", label="Normalisation", scale=3)
                with gr.Column(scale=2, min_width=200):
                    special = gr.Checkbox(False, label="Show start/end tokens",
                                          info="CLIP's start token soaks up most attention")
                    negative = gr.Checkbox(False, label="Negative prompt's maps")
                alpha = gr.Slider(0, 1, value=0.6, step=0.05, label="Overlay alpha", scale=2)
            note = gr.Markdown(label="Shown")
            with gr.Tabs():
                with gr.Tab("Words"):
                    words = maps_gallery("Where each word looked", 5, elem_id="word-maps")
                    words_note = gr.Markdown(words_note_for(pipe), elem_classes="small-note")
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
            shown = [gr.update(visible=name == model) for name in names]
            return [*shown, *shown, gr.update(placeholder=placeholder_for(examples[model])),
                    gr.update(info=RELATION_INFO + layout_off(chosen)),
                    gr.update(info=OBJECT_INFO + layout_off(chosen)), words_note_for(chosen)]

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
        model.change(select_model, [model], [*example_panels, *about_panels, prompt, relation_guidance,
                                             object_guidance, words_note], **private)
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
    found = sorted(str(p) for p in root.iterdir() if (p / "unet").is_dir()) if root.is_dir() else []
    return sorted(found, key=lambda p: p != DEFAULT_MODEL) or [DEFAULT_MODEL]


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
    _COMPUTE.submit(torch.set_num_threads, os.cpu_count() or 1).result()
    # The first sampling run builds the CPU kernels for its shapes (~1.5 s here). Do that for the default
    # settings while Gradio builds and starts the server: queued on the torch thread, the first request
    # waits for it (the default model's first, then the others').
    for pipe in models.values():
        _COMPUTE.submit(warm_up, pipe)
    build_demo(models, settings).launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME,
                                      css=CSS, **launch_options(settings))


def add_settings_flags(parser: argparse.ArgumentParser, defaults: Settings) -> None:
    """A flag per Settings field (--cache-ttl-s, --no-mcp, …), its default from the environment (APP_*)."""
    for f in fields(Settings):
        flag, env = "--" + f.name.replace("_", "-"), ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata['help']} (env {env}; default: %(default)s)"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name),
                                help=help_text)
        else:
            parser.add_argument(flag, type=int, default=getattr(defaults, f.name), help=help_text)


if __name__ == "__main__":
    main()
