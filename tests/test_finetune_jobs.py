"""The app's fine-tune jobs (finetune_jobs.py): the data check names bad files, a zip cannot escape its folder,
and a run is train.py in a background process that finishes, stops keeping its checkpoint, resumes, and is
the only one at a time."""

import json
import time
import zipfile

import pytest
from PIL import Image

import train
from finetune_jobs import Busy, FineTuneJobs, safe_extract
from tests.tiny import OWN_CAPTIONS, tiny_pipeline

TINY = ("--resolution", "16", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1", "--checkpoint-every", "2",
        "--validate-every", "1000", "--mixed-precision", "no", "--validation-steps", "2")


def write_pictures(folder, bad: bool = True):
    """Six good captioned pictures; with bad, also a corrupt image and a row without a caption."""
    folder.mkdir(parents=True)
    rows = []
    for i, caption in enumerate(OWN_CAPTIONS[:6]):
        Image.new("RGB", (20, 20), (40 * i, 200 - 30 * i, 90)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": caption})
    if bad:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        rows.append({"file_name": "broken.png", "text": "a broken picture"})
        Image.new("RGB", (20, 20)).save(folder / "quiet.png")
        rows.append({"file_name": "quiet.png", "text": ""})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "init"
    tiny_pipeline(OWN_CAPTIONS, grammar=None).save_pretrained(folder)
    return folder


def jobs_in(tmp_path, base, **kw):
    return FineTuneJobs(tmp_path / "runs", base, extra_args=TINY, **kw)


def wait_for(predicate, timeout=240, what="it"):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_check_names_the_corrupt_picture_and_the_captionless_row_and_estimates_the_time(tmp_path, base):
    pictures = write_pictures(tmp_path / "pictures")
    archive = tmp_path / "pictures.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # a zipped folder: the metadata one level down
        for p in pictures.iterdir():
            zf.write(p, f"pictures/{p.name}")
    jobs = jobs_in(tmp_path, base)
    report = jobs.check(str(archive), name="mine", steps=3)
    assert report.images == 6 and report.caption_column == "text" and report.sizes == [("20x20", 6)]
    assert len(report.skipped) == 2
    assert any(s.startswith("broken.png") and "unreadable" in s for s in report.skipped)
    assert any(s.startswith("quiet.png") and "empty caption" in s for s in report.skipped)
    assert report.steps == 3 and report.batch_size == 4 and report.seconds > 0
    text = report.summary()
    assert "6 pictures" in text and "2 skipped" in text and "broken.png" in text and "pictures/s" in text
    written = [json.loads(line) for line in (tmp_path / "runs" / "mine" / "data" / "metadata.jsonl").open()]
    assert len(written) == 6 and all(r["file_name"].startswith("/") for r in written)
    with pytest.raises(ValueError, match="exists already"):
        jobs.check(str(pictures), name="mine")


def test_without_steps_the_check_uses_train_pys_own_choice(tmp_path, base):
    jobs = FineTuneJobs(tmp_path / "runs", base)
    report = jobs.check(str(write_pictures(tmp_path / "p", bad=False)))
    assert report.steps == 200 and report.batch_size == 16  # resolve_auto: 6 pictures → its least steps
    assert report.resolution == 16  # the base's own size
    big = tiny_pipeline(OWN_CAPTIONS, grammar=None)
    big.unet = train.at_resolution(big.unet, 64)  # a 64 px base (like weights/clipart) trains at 32 px, as train.py
    big.save_pretrained(tmp_path / "big")
    report = jobs.check(str(tmp_path / "p"), name="big", base=tmp_path / "big")
    assert report.resolution == 32 and "trained at 32 px" in report.summary()


def test_a_run_starts_from_the_model_it_was_checked_with(tmp_path, base):
    other = tmp_path / "clipart"
    tiny_pipeline(OWN_CAPTIONS, grammar=None).save_pretrained(other)
    jobs = jobs_in(tmp_path, base)
    pictures = write_pictures(tmp_path / "p", bad=False)
    report = jobs.check(str(pictures), name="on-other", steps=3, base=other)
    assert "starting from the model *clipart*" in report.summary()
    command = jobs.command("on-other")
    assert command[command.index("--init") + 1] == str(other.resolve())
    jobs.check(str(pictures), name="on-default", steps=3)  # no base named: the jobs' own
    command = jobs.command("on-default")
    assert command[command.index("--init") + 1] == str(base.resolve())
    with pytest.raises(ValueError, match="not a pipeline folder"):
        jobs.check(str(pictures), name="nowhere", base=tmp_path / "missing")
    assert "nowhere" not in jobs.runs()


def test_what_cannot_be_trained_is_refused_plainly(tmp_path, base, monkeypatch):
    jobs = jobs_in(tmp_path, base)
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ""}) + "\n")
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    with pytest.raises(ValueError, match="none of the 1 rows"):
        jobs.check(str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Hub can't be reached"):
        jobs.check("someone/cats")
    with pytest.raises(ValueError, match="does not read folders"):
        jobs_in(tmp_path, base, allow_local=False).check(str(folder))
    assert jobs.runs() == []  # a refused check leaves no run behind


@pytest.mark.parametrize("entry", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt"])
def test_a_zip_cannot_write_outside_its_folder(tmp_path, entry):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(entry, "gotcha")
    with pytest.raises(ValueError, match="outside the folder"):
        safe_extract(archive, tmp_path / "out", max_bytes=2**20)
    assert not (tmp_path / "evil.txt").exists()


def test_a_zip_past_the_size_limit_or_not_a_zip_is_refused(tmp_path):
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * 3 * 2**20)  # 3 MB of zeros: a few KB zipped
    with pytest.raises(ValueError, match="more than 1 MB"):
        safe_extract(archive, tmp_path / "out", max_bytes=2**20)
    (tmp_path / "fake.zip").write_text("hello")
    with pytest.raises(ValueError, match="not a zip file"):
        safe_extract(tmp_path / "fake.zip", tmp_path / "out2", max_bytes=2**20)


def test_a_run_trains_in_the_background_and_exports_a_model(tmp_path, base):
    jobs = jobs_in(tmp_path, base)
    jobs.check(str(write_pictures(tmp_path / "p")), name="quick", steps=3)
    assert jobs.start("quick", who="ada") == "Started 'quick'."
    wait_for(lambda: jobs.status("quick").state != "running", what="the run to end")
    status = jobs.status("quick")
    assert status.state == "finished", jobs.log_tail("quick")
    assert [s for s, _ in status.losses] == [1, 2, 3] and status.grid.endswith("step_000003.png")
    assert jobs.pipeline("quick") is not None and jobs.zip_pipeline("quick").stat().st_size > 0
    with zipfile.ZipFile(jobs.zip_pipeline("quick")) as zf:
        assert "quick/unet/model.safetensors" in zf.namelist()
    with pytest.raises(ValueError, match="has finished"):
        jobs.start("quick")


def test_a_cancelled_run_keeps_its_checkpoint_resumes_and_is_the_only_one(tmp_path, base, monkeypatch):
    jobs = jobs_in(tmp_path, base)
    jobs.check(str(write_pictures(tmp_path / "p")), name="long", steps=100_000)  # runs until cancelled
    jobs.check(str(tmp_path / "p"), name="other", steps=2)
    jobs.start("long", who="ada")
    try:
        wait_for(lambda: jobs.status("long").checkpoint, what="a first checkpoint")
        with pytest.raises(Busy, match="'long' by ada is running"):
            jobs.start("other")
        assert "One fine-tune at a time" in jobs.busy()
    finally:
        message = jobs.cancel()
    status = jobs.status("long")
    assert status.state == "stopped" and status.checkpoint and f"step {status.checkpoint} is kept" in message
    assert jobs.busy() is None
    # Resume: the same command, from the newest checkpoint (a shorter run, so the test ends soon)
    job = json.loads((tmp_path / "runs" / "long" / "job.json").read_text())
    kept = status.checkpoint
    assert jobs.start("long") == f"Resumed 'long' from step {kept}."
    wait_for(lambda: max((s for s, _ in jobs.status("long").losses), default=0) > kept + 1,
             what="steps after the checkpoint")
    jobs.cancel()
    assert job["steps"] == 100_000


def test_old_runs_are_cleaned_by_count(tmp_path, base):
    jobs = jobs_in(tmp_path, base, keep_runs=2)
    pictures = write_pictures(tmp_path / "p", bad=False)
    for name in ("a", "b", "c"):
        jobs.check(str(pictures), name=name, steps=2)
        time.sleep(0.01)
    assert jobs.runs() == ["c", "b"]


def test_the_apps_tab_checks_trains_shows_progress_and_offers_the_new_model(tmp_path, base):
    import gradio as gr

    import app

    pictures = write_pictures(tmp_path / "p")
    archive = tmp_path / "p.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in pictures.iterdir():
            zf.write(p, p.name)
    jobs = jobs_in(tmp_path, base)
    demo = app.build_demo({"base": tiny_pipeline(OWN_CAPTIONS, grammar=None)}, jobs=jobs)
    try:
        ours = [f for f in demo.fns.values() if f.fn is not None and f.fn.__module__ == "app"]
        assert [f.name for f in ours if f.preprocess] == []  # raw inputs, as every event of the app
        fn = {f.name: f.fn for f in ours}
        report, runs = fn["checked"]({"path": str(archive)}, "", "mine", 3, "base", None)  # a gr.File's raw value
        assert "6 pictures" in report and "broken.png" in report and runs["value"] == "mine"
        with pytest.raises(gr.Error, match="steps must be a whole number"):
            fn["checked"]({"path": str(archive)}, "", "again", -2, "base", None)
        assert fn["opened"]()[0]["value"] is None and not fn["opened"]()[1].active
        said, timer = fn["started"]("mine", None)
        assert said == "Started 'mine'." and timer.active
        runs, timer = fn["opened"]()  # another page opened now follows the run
        assert runs["value"] == "mine" and timer.active
        last, seen_points, seen_grid = {}, 0, None
        end = time.time() + 240
        while time.time() < end:
            message, plot, grid, button, offered, last, timer = fn["poll"]("mine", last)
            if isinstance(plot, dict) and plot.get("value") is not None:
                seen_points = len(plot["value"]["data"]) if isinstance(plot["value"], dict) else len(plot["value"])
            seen_grid = grid if isinstance(grid, str) else seen_grid
            if last["state"] != "running":
                break
            assert not button["interactive"]  # no second start of a running run
            time.sleep(0.5)
        assert last["state"] == "finished", jobs.log_tail("mine")
        assert seen_points == 3 and seen_grid.endswith("step_000003.png") and not timer.active
        assert offered["choices"] == ["base", "mine"] and offered["value"] == "mine" and offered["visible"]
        assert "in the Model selector" in message
        select = next(f for f in demo.fns.values() if f.name == "select_model").fn
        assert select("mine")[2].startswith(select("base")[2][:10])  # the new model's words are shown
        assert fn["poll"]("mine", last)[4] == gr.update()  # offered once
        assert fn["zip_model"]("mine").endswith("mine.zip")
        assert "offline" in fn["push_model"]("mine", "someone/mine", "") or "Could not push" in \
            fn["push_model"]("mine", "someone/mine", "")
    finally:
        demo.close()


def test_a_run_left_training_by_a_restarted_app_is_still_the_one_run(tmp_path, base):
    before = jobs_in(tmp_path, base)
    before.check(str(write_pictures(tmp_path / "p")), name="long", steps=100_000)  # runs until cancelled
    before.check(str(tmp_path / "p"), name="other", steps=2)
    before.start("long", who="ada")
    after = jobs_in(tmp_path, base)  # the app restarted: a new instance over the same folder
    try:
        wait_for(lambda: after.status("long").step > 0, what="a first step")
        assert after.status("long").state == "running"
        with pytest.raises(Busy, match="'long' by ada is running"):
            after.start("other")
    finally:
        assert after.cancel().startswith("Stopped 'long'")
    assert after.status("long").state == "stopped"
    wait_for(lambda: before.status("long").state == "stopped", timeout=30, what="its parent to see it end")
    assert after.busy() is None


def test_after_a_restart_the_finished_runs_are_offered_under_names_of_their_own(tmp_path, base):
    import app

    jobs = jobs_in(tmp_path, base)
    jobs.check(str(write_pictures(tmp_path / "p", bad=False)), name="base", steps=2)  # the served model's name
    jobs.start("base")
    wait_for(lambda: jobs.status("base").state != "running", what="the run to end")
    demo = app.build_demo({"base": tiny_pipeline(OWN_CAPTIONS, grammar=None)}, jobs=jobs_in(tmp_path, base))
    try:
        selector = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model")
        assert [c[1] for c in selector.choices] == ["base", "base (fine-tune)"] and selector.visible
        poll = next(f for f in demo.fns.values() if f.name == "poll").fn
        offered = poll("base", {})[4]  # a tab that sees it finished selects it: loaded once, not again
        assert offered["choices"] == ["base", "base (fine-tune)"] and offered["value"] == "base (fine-tune)"
    finally:
        demo.close()
