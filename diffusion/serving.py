"""What keeps a long-running public server of a pipeline bounded: its memory (the maps of the runs its sessions
hold) and its disk (the files it serves).

    settings = Settings.from_env()                    # APP_* variables over the defaults
    budget = MapsBudget(settings.maps_budget_mb * 2**20, executor)
    budget.hold(result)                               # a session's new run; the oldest runs' maps go past the budget
    cache = CacheKeeper(cache_folder, settings)
    cache.export(result, self_attention=False)        # a zip of the run's maps, at most max_exports of them kept

The app (app.py) wires these into Gradio: `Settings` into its State lifetimes, queue and launch, `MapsBudget`
into the sessions' State, `CacheKeeper` into Gradio's cache folder. Nothing here imports Gradio.
"""

import argparse
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import dataclass, field, fields
from pathlib import Path

from diffusion.pipeline import GenerationResult
from diffusion.render import DISPLAY

ENV_PREFIX = "APP_"


def setting(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class Settings:
    """What keeps a long-running public server bounded. Each field comes from the environment variable
    APP_<FIELD> (e.g. APP_CACHE_TTL_S=600) or from app.py's flag (--cache-ttl-s 600); these are the defaults."""

    cache_ttl_s: int = setting(1800, "files Gradio serves (samples, overlays, export zips) are deleted this many "
                                     "seconds after they were written (Gradio's delete_cache, run every 5 min)")
    max_exports: int = setting(20, "export zips kept at once; the oldest goes first")
    session_ttl_s: int = setting(1800, "a session's maps are released this many seconds after its last generate "
                                       "(at once when its tab closes)")
    maps_budget_mb: int = setting(1024, "MB of maps all sessions hold together; past it the oldest run's go")
    max_sessions: int = setting(1000, "sessions Gradio remembers at once; the oldest is forgotten")
    queue_size: int = setting(32, "requests that may wait in the queue; one more is told the queue is full")
    mcp: bool = setting(True, "also serve the endpoints as MCP tools at /gradio_api/mcp/")
    finetune: bool = setting(True, "show the Fine-tune tab: people train the first model on their own pictures "
                                   "(one run at a time, in a background train.py)")
    finetune_threads: int = setting(1, "CPU threads a fine-tune run gets (it is also niced): the rest keep sampling "
                                       "responsive")
    finetune_keep_runs: int = setting(5, "fine-tune runs kept on disk (data, checkpoints, export, zip); the oldest "
                                         "go first, never the running one")
    finetune_upload_mb: int = setting(500, "the largest upload a fine-tune accepts, unpacked, in MB")
    finetune_local_data: bool = setting(True, "a fine-tune may also read a folder on this machine by its path (turn "
                                              "it off on a public Space: uploads only)")

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


class MapsBudget:
    """The attention maps of every session's last run, held under one byte budget.

    A run's maps take 33 MB for 4 images and 66 MB for 8 (the shipped model: per-layer, per-bin sums, and
    self-attention's (N, N) maps), and Gradio keeps a session's State until its time_to_live, or an hour after
    its tab closes. Past the budget, the oldest run's maps are released (its explorer then asks for a new run),
    so memory stays bounded however many sessions are open. Maps change only on `executor`'s thread, the one
    where the maps are read (the app's torch thread): a render never sees its maps vanish halfway.

    Args:
        limit_bytes: what all held runs' maps may take together (a run larger than that still stays until the
            next one comes).
        executor: runs the changes; one worker. Call hold and release from other threads (hold waits for it).
    """

    def __init__(self, limit_bytes: int, executor: Executor):
        self.limit = limit_bytes
        self.executor = executor
        self._held: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()  # id(result) -> (ref, bytes)
        self._lock = threading.Lock()  # the dict: a result garbage-collected on any thread removes itself

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._held.values())

    def hold(self, result: GenerationResult) -> None:
        """Count a new run's maps in, releasing the oldest runs' while over budget (never the newest)."""
        self.executor.submit(self._hold, result).result()

    def _hold(self, result: GenerationResult) -> None:
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
        event loop, which must not wait for a sampling run on the executor's thread."""
        if isinstance(result, GenerationResult):
            self.executor.submit(self._release, result)

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
