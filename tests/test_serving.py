"""A long-running server's bounds (diffusion/serving.py): its settings from the environment or flags, the maps
budget of its sessions' runs, and the export zips and empty folders of Gradio's cache. tests/test_app_soak.py
holds the app to them over a few hundred requests."""

import argparse
import io
import json
import os
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from diffusion.pipeline import GenerationResult
from diffusion.serving import CacheKeeper, MapsBudget, Settings, add_settings_flags
from tests.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def result(pipe):
    """A run as the app records one: 2 images, 3 steps in 3 timestep bins, a negative prompt."""
    return pipe("a red circle above a blue square", negative_prompt="green triangle", num_images=2, steps=3, seed=11,
                sampler="ddim", record_attention=True, attention_bins=4)


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="maps") as pool:
        yield pool


# -- settings ---------------------------------------------------------------------------------------
def test_settings_come_from_app_variables_and_a_bad_one_is_named():
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"APP_CACHE_TTL_S": "600", "APP_MCP": "no", "OTHER": "x"}) == Settings(cache_ttl_s=600,
                                                                                                   mcp=False)
    assert Settings.from_env({"APP_MCP": " TRUE "}).mcp is True
    with pytest.raises(ValueError, match=r"APP_MAX_EXPORTS='20 zips' is not a whole number\."):
        Settings.from_env({"APP_MAX_EXPORTS": "20 zips"})
    with pytest.raises(ValueError, match=r"APP_MCP='maybe': use 1 or 0 \(true/false\)\."):
        Settings.from_env({"APP_MCP": "maybe"})
    with pytest.raises(ValueError, match=r"queue_size must be at least 1, got 0\."):
        Settings.from_env({"APP_QUEUE_SIZE": "0"})


def test_every_setting_has_a_flag_defaulting_to_the_environment():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, Settings(max_exports=7))
    defaults = parser.parse_args([])
    assert {f.name: getattr(defaults, f.name) for f in fields(Settings)} == vars(Settings(max_exports=7))
    args = parser.parse_args(["--cache-ttl-s", "60", "--no-mcp", "--queue-size", "4"])
    assert Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)}) == Settings(
        cache_ttl_s=60, mcp=False, queue_size=4, max_exports=7)
    assert "(env APP_MAPS_BUDGET_MB; default: 1024)" in " ".join(parser.format_help().split())


# -- maps budget ------------------------------------------------------------------------------------
def test_the_maps_budget_releases_the_oldest_runs_never_the_newest(pipe, executor):
    runs = [pipe("a red circle", num_images=1, steps=1, seed=s, record_attention=True) for s in range(3)]
    size = runs[0].attention.store.nbytes()
    budget = MapsBudget(2 * size, executor)
    for run in runs:
        budget.hold(run)
    assert [r.attention is None for r in runs] == [True, False, False] and budget.nbytes == 2 * size
    alone = MapsBudget(size // 2, executor)  # a run larger than the whole budget still stays until the next one
    alone.hold(runs[2])
    assert runs[2].attention is not None and alone.nbytes == size
    budget.release(runs[1])
    executor.submit(lambda: None).result()  # release is queued on the executor's thread
    assert runs[1].attention is None and budget.nbytes == size
    budget.release(None)  # a session that never generated: nothing to release
    del runs[2], run  # a run Gradio forgot (its session dropped) leaves the budget with it
    assert budget.nbytes == 0 and alone.nbytes == 0


class Watched(GenerationResult):
    """A run that notes the thread each change of its maps happens on."""

    def __setattr__(self, name, value):
        if name == "attention":
            self.__dict__.setdefault("threads", []).append(threading.current_thread().name)
        super().__setattr__(name, value)


def test_maps_change_only_on_the_executors_thread(pipe, executor):
    """The explorer reads maps on that thread: a render must never see its maps vanish halfway."""
    runs = []
    for seed in range(2):
        run = pipe("a red circle", num_images=1, steps=1, seed=seed, record_attention=True)
        runs.append(Watched(**{f.name: getattr(run, f.name) for f in fields(run)}))
        runs[-1].threads.clear()
    budget = MapsBudget(1, executor)
    budget.hold(runs[0])
    budget.hold(runs[1])  # over budget: the first run's maps go
    budget.release(runs[1])
    executor.submit(lambda: None).result()
    assert runs[0].attention is None and runs[1].attention is None
    assert [name.startswith("maps") for run in runs for name in run.threads] == [True, True]


# -- the cache --------------------------------------------------------------------------------------
def test_export_zip_has_png_npz_and_json(result, tmp_path):
    cache = CacheKeeper(tmp_path, Settings())
    path = cache.export(result, self_attention=False)
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        meta = json.loads(z.read("maps.json"))
        arrays = np.load(io.BytesIO(z.read("maps.npz")))
        assert "image1.words" in arrays.files and arrays["image1.words"].dtype == np.float16
        assert not [k for k in arrays.files if "self_attn" in k]  # only when asked: 95% of the bytes
    assert {"maps.json", "maps.npz", "image0.png", "image1_red.png"} <= names
    assert meta["seed"] == 11 and meta["negative_prompts"] == ["green triangle"] * 2
    assert Path(path).is_relative_to(tmp_path / "exports") and len(list(tmp_path.rglob("*.png"))) == 0  # zip only
    with zipfile.ZipFile(cache.export(result, self_attention=True)) as z:
        arrays = np.load(io.BytesIO(z.read("maps.npz")))
        layer = result.attention.layers("self")[0]
        assert arrays[f"image0.{layer}"].shape == (3, 64, 64) and layer in json.loads(z.read("maps.json"))[
            "exported_layers"]
        assert z.getinfo("image0.png").file_size > 0


def test_a_word_longer_than_a_file_name_exports(pipe, tmp_path):
    res = pipe("a" * 300, steps=1, seed=0, record_attention=True)  # found by tests/test_app_fuzz.py
    with zipfile.ZipFile(CacheKeeper(tmp_path, Settings()).export(res, self_attention=False)) as z:
        assert max(len(name) for name in z.namelist()) < 100


def test_exports_are_kept_up_to_max_exports_oldest_first(result, tmp_path):
    cache = CacheKeeper(tmp_path, Settings(max_exports=2))
    paths = []
    for _ in range(4):
        paths.append(Path(cache.export(result, self_attention=False)))
        time.sleep(0.01)  # distinct modification times
    assert [p.exists() for p in paths] == [False, False, True, True]


def test_the_sweep_removes_old_empty_folders_at_most_once_an_interval(tmp_path):
    settings = Settings(cache_ttl_s=600)
    assert CacheKeeper.delete_cache(settings) == (300, 600)  # look every 5 min at most, delete after the TTL
    assert CacheKeeper.delete_cache(Settings(cache_ttl_s=60)) == (60, 60)
    old = time.time() - 601
    for name in ("old-empty", "old-full", "new-empty"):
        (tmp_path / name).mkdir()
    (tmp_path / "old-full" / "image.png").write_bytes(b"png")
    for name in ("old-empty", "old-full"):
        os.utime(tmp_path / name, (old, old))
    cache = CacheKeeper(tmp_path, settings)
    cache.sweep()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new-empty", "old-full"]
    (tmp_path / "again").mkdir()
    os.utime(tmp_path / "again", (old, old))
    cache.sweep()  # within the interval: not looked at
    assert (tmp_path / "again").exists()
    cache.sweep(force=True)
    assert not (tmp_path / "again").exists()
    CacheKeeper(tmp_path / "missing", settings).sweep()  # no cache folder yet: nothing to do
