"""Training: a few-step CLI run exports a pipeline that samples; kill-and-resume equals an uninterrupted run."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

import train
from core import checkpoints as ckpt
from data.shapes import ShapesConfig, generate_dataset
from diffusion.pipeline import TextToImagePipeline
from tests.tiny import randomize_, tiny_pipeline


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    generate_dataset(root / "data", ShapesConfig(size=32, seed=0), counts={"train": 24}, workers=1, progress=False)
    tiny_pipeline().save_pretrained(root / "init")
    return root


def args(setup, out, *extra):
    return ["--init", str(setup / "init"), "--data", str(setup / "data"), "--out", str(out), "--resolution", "16",
            "--batch-size", "4", "--lr", "1e-3", "--warmup", "1", "--checkpoint-every", "2", "--validate-every", "100",
            "--mixed-precision", "no", "--validation-prompts", "a red circle", "--validation-steps", "2", *extra]


def test_cli_trains_checkpoints_and_exports_a_pipeline(setup):
    out = setup / "smoke"
    train.main(args(setup, out, "--steps", "3"))
    assert [s for s, _ in train.checkpoints(out / "checkpoints")] == [2, 3]
    state = json.loads((out / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["step"] == 3 and state["config"]["batch_size"] == 4
    assert (out / "samples" / "step_000003.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard: loss, lr, images/s, grids
    pipe = TextToImagePipeline.from_pretrained(out / "pipeline", dtype="fp32")
    result = pipe("a red circle", steps=2, seed=0)
    assert result.images[0].size == (16, 16)
    assert "Training config" in (out / "pipeline" / "README.md").read_text()
    unet_card = (out / "pipeline" / "unet" / "README.md").read_text()  # the mixin's card points at the pipeline's
    assert "one level up" in unet_card and "More Information Needed" not in unet_card
    before = tiny_pipeline().unet.state_dict()
    after = pipe.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # training changed the weights
    stored = load_file(out / "pipeline" / "unet" / "model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}  # half the size on disk…
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())  # …loaded back as fp32


def ema_equal(pipe: TextToImagePipeline, checkpoint: Path) -> bool:
    ema = load_file(checkpoint / "ema.safetensors")
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    return all(torch.equal(p, ema[str(i)]) for i, p in enumerate(params))


def test_export_only_writes_the_newest_checkpoints_ema_weights(setup):
    out = setup / "export"
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        train.main(["--out", str(out), "--export-only"])
    train.main(args(setup, out, "--steps", "3"))
    (out / "pipeline").rename(out / "final")
    train.main(["--out", str(out), "--export-only", "--export-dtype", "fp32"])
    pipe = TextToImagePipeline.from_pretrained(out / "pipeline", dtype="fp32")
    assert ema_equal(pipe, out / "checkpoints" / "step_000003")
    final = TextToImagePipeline.from_pretrained(out / "final", dtype="fp32")  # the run's export: same weights, fp16
    pairs = zip(pipe.unet.parameters(), final.unet.parameters(), strict=True)
    assert all(torch.equal(a.half().float(), b) for a, b in pairs)
    assert "3 steps" in (out / "pipeline" / "README.md").read_text()

    # --export-step: an older checkpoint, beside the newest's export (to evaluate a run along the way)
    train.main(["--out", str(out), "--export-only", "--export-step", "2", "--export-dtype", "fp32"])
    older = TextToImagePipeline.from_pretrained(out / "pipeline_step_000002", dtype="fp32")
    assert ema_equal(older, out / "checkpoints" / "step_000002")
    assert not ema_equal(older, out / "checkpoints" / "step_000003")
    assert "2 steps" in (out / "pipeline_step_000002" / "README.md").read_text()
    assert ema_equal(TextToImagePipeline.from_pretrained(out / "pipeline", dtype="fp32"),
                     out / "checkpoints" / "step_000003")  # the newest's export is left as it was
    with pytest.raises(FileNotFoundError, match=r"no finished checkpoint at step 1 .* it has steps 2, 3"):
        train.main(["--out", str(out), "--export-only", "--export-step", "1"])
    with pytest.raises(ValueError, match="give --export-only too"):
        train.main(["--out", str(out), "--export-step", "2"])


@pytest.fixture(scope="module")
def straight(setup):
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4): what every interrupted run must end equal to."""
    train.main(args(setup, setup / "straight", "--steps", "4"))
    return setup / "straight"


def assert_same_weights(a: Path, b: Path) -> None:
    """Two step-4 checkpoints hold the same tensors (to 1e-6; in practice bit for bit)."""
    for name in ("unet", "text_encoder", "ema", "optimizer"):  # fine-tuning trains the text side too
        x = load_file(a / "checkpoints" / "step_000004" / f"{name}.safetensors")
        y = load_file(b / "checkpoints" / "step_000004" / f"{name}.safetensors")
        assert x.keys() == y.keys(), name
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")


def test_kill_and_resume_matches_an_uninterrupted_run(setup, straight, monkeypatch):

    calls = {"n": 0}
    real_loss = train.diffusion_loss

    def dies_at_step_3(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed mid-run, after the step-2 checkpoint
        return real_loss(*a, **kw)

    monkeypatch.setattr(train, "diffusion_loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(setup, setup / "resumed", "--steps", "4"))
    assert [s for s, _ in train.checkpoints(setup / "resumed" / "checkpoints")] == [2]
    monkeypatch.setattr(train, "diffusion_loss", real_loss)
    train.main(args(setup, setup / "resumed", "--steps", "4"))
    assert_same_weights(straight, setup / "resumed")


def run_train(argv: list[str], pause: str | None = None, marker: Path | None = None) -> subprocess.Popen:
    """A real train.py process (through tests/killable_train.py when it is to pause at a point), with this
    process's thread count, so that its arithmetic is the in-process run's."""
    root = Path(train.__file__).parent
    cmd = ([sys.executable, "tests/killable_train.py", pause, str(marker), "--"] if pause
           else [sys.executable, "train.py"])
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*cmd, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=root)


def kill_when_paused(proc: subprocess.Popen, marker: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        assert proc.poll() is None, f"train.py ended before its pause:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "train.py never reached its pause"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no exception, no cleanup: the process just stops
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow  # three train.py processes: ~30 s on 2 cores
def test_a_process_killed_mid_run_and_mid_checkpoint_resumes_to_the_same_weights(setup, straight, tmp_path):
    out = setup / "killed"
    argv = args(setup, out, "--steps", "4")
    # SIGKILL in the middle of step 3, after the step-2 checkpoint …
    kill_when_paused(run_train(argv, "step:3", tmp_path / "mid-run"), tmp_path / "mid-run")
    assert [s for s, _ in train.checkpoints(out / "checkpoints")] == [2]
    # … then, resumed, again while it writes the step-4 checkpoint (its first tensor file written) …
    kill_when_paused(run_train(argv, "checkpoint:4", tmp_path / "mid-save"), tmp_path / "mid-save")
    assert [s for s, _ in train.checkpoints(out / "checkpoints")] == [2]  # the half-written one is not picked
    assert list((out / "checkpoints" / ".tmp_step_000004").glob("*.safetensors"))
    # … and the third process resumes from step 2 and ends where the uninterrupted run did.
    proc = run_train(argv)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert "(step 2)" in output and "resuming from" in output
    assert [s for s, _ in train.checkpoints(out / "checkpoints")] == [2, 4]
    assert not list((out / "checkpoints").glob(".tmp_step_*"))  # the half-written folder is cleaned up
    assert_same_weights(straight, out)


def test_a_full_disk_while_saving_keeps_the_last_good_checkpoint_and_says_so(setup, straight, monkeypatch, capsys):
    out = setup / "full-disk"
    real_save = ckpt.save_file

    def disk_fills_at_step_4(tensors, path, *a, **kw):
        if ".tmp_step_000004" in str(path) and path.name != "unet.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(tensors, path, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", disk_fills_at_step_4)
    with pytest.raises(SystemExit) as stopped:
        train.main(args(setup, out, "--steps", "4"))
    message = str(stopped.value.code)
    good = out / "checkpoints" / "step_000002"
    assert message.startswith("train.py stopped: could not write the step-4 checkpoint")
    assert "No space left on device" in message
    assert f"The last good checkpoint, {good} (step 2), is intact" in message and "re-run" in message
    assert [s for s, _ in train.checkpoints(out / "checkpoints")] == [2]
    assert not list((out / "checkpoints").glob(".tmp_step_*"))  # no half checkpoint takes up the space
    # intact: the run resumes from it, once there is room, and ends as if nothing had happened
    monkeypatch.setattr(ckpt, "save_file", real_save)
    train.main(args(setup, out, "--steps", "4"))
    assert "resuming from" in capsys.readouterr().out
    assert_same_weights(straight, out)


def test_fine_tuning_can_add_context_layers_and_a_position_embedding(setup):
    """--context-layers, --position-embedding on an --init U-Net without them: the same function at step 0,
    then trained, exported and resumed."""
    init = randomize_(TextToImagePipeline.from_pretrained(setup / "init", dtype="fp32").unet)
    cfg = train.TrainConfig(init=str(setup / "init"), context_layers=1, position_embedding=True)
    grown = train.build(cfg)[0]
    assert grown.config.context_layers == 1 and grown.config.position_embedding and grown.training
    grown.load_state_dict({**grown.state_dict(), **init.state_dict()})  # init's weights, the fresh parts' zeros
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.randn(2, 5, 32)
    torch.testing.assert_close(grown.eval()(x, t, ctx), init(x, t, ctx), rtol=0, atol=0)
    kept = train.build(train.TrainConfig(init=str(setup / "init")))[0].config
    assert kept.context_layers == 0 and not kept.position_embedding
    assert train.parse_args(["--out", "x"]).position_embedding is None
    assert train.parse_args(["--out", "x", "--position-embedding"]).position_embedding is True

    out = setup / "refined"
    flags = ("--context-layers", "1", "--position-embedding")
    train.main(args(setup, out, "--steps", "2", *flags))
    pipe = TextToImagePipeline.from_pretrained(out / "pipeline", dtype="fp32")
    assert pipe.unet.config.context_layers == 1 and pipe.unet.config.position_embedding
    assert pipe.unet.context_refiner.layers[0].to_out.weight.abs().sum() > 0  # trained away from zero
    assert pipe.unet.down[1][0].position.proj.weight.abs().sum() > 0
    train.main(args(setup, out, "--steps", "3", *flags))  # resumes from the step-2 checkpoint
    assert [s for s, _ in train.checkpoints(out / "checkpoints")][-1] == 3


def test_from_scratch_trains_at_the_presets_size_on_a_frozen_text_encoder(setup):
    out = setup / "scratch"
    train.main(["--data", str(setup / "data"), "--text-encoder", str(setup / "init"), "--preset", "tiny",
                "--out", str(out), "--steps", "1", "--batch-size", "2", "--mixed-precision", "no",
                "--validation-prompts", "a red circle", "--validation-steps", "2"])
    state = json.loads((out / "checkpoints" / "step_000001" / "state.json").read_text())
    assert state["config"]["resolution"] == 16 and state["config"]["text_encoder_training"] == "frozen"
    pipe = TextToImagePipeline.from_pretrained(out / "pipeline", dtype="fp32")
    assert pipe.unet.config.sample_size == 16
    assert len(pipe.text_encoder.tokenizer) == len(tiny_pipeline().text_encoder.tokenizer)  # not grown


def test_half_written_checkpoints_are_ignored(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, {"unet": {"w": torch.ones(2)}}, {"step": 5}, keep=3)
    (tmp_path / ".tmp_step_000007").mkdir()  # a run killed while writing step 7
    (tmp_path / "step_000009").mkdir()  # no state.json: never finished
    assert [s for s, _ in train.checkpoints(tmp_path)] == [5]


def test_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"unet": {"w": torch.full((1,), float(step))}}, {"step": step}, keep=2)
    assert [s for s, _ in train.checkpoints(tmp_path)] == [3, 4]


def old_get_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """train.py's hand-written schedule before transformers' took its place: what it must still give."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def scheduled_lrs(peaks: list[float], warmup: int, steps: int, done: int = 0) -> list[list[float]]:
    """Each param group's rate at steps done, done + 1, … steps - 1, as train.py runs the schedule."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": peak} for peak in peaks]
    optimizer = torch.optim.AdamW(groups)
    scheduler = ckpt.lr_schedule(optimizer, warmup, steps, done=done, min_lr_rate=0.1)
    rates = []
    for _ in range(done, steps):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def test_lr_schedule_is_the_old_formula_for_every_group_and_resumes_from_the_step():
    peaks, warmup, steps = [1e-3, 2e-4, 5e-3], 10, 110  # U-Net, text body, embeddings
    rates = scheduled_lrs(peaks, warmup, steps)
    for step in (10, 11, 30, 60, 109):  # after warmup: the old values exactly, each group at its own peak
        for peak, rate in zip(peaks, rates[step], strict=True):
            assert rate == pytest.approx(old_get_lr(step, peak, warmup, steps), rel=1e-12)
    assert rates[60][0] == pytest.approx(1e-3 * (0.1 + 0.45))
    assert rates[109][0] == pytest.approx(1e-4, rel=1e-2)  # ~10% of the peak at the end
    # warmup: transformers' ramp starts at 0, one step behind the old (step + 1) / warmup
    for step in (0, 5, 9):
        assert rates[step][0] == pytest.approx(old_get_lr(step - 1, 1e-3, warmup, steps) if step else 0.0)
    # rebuilt at a resumed run's step, it carries on exactly where the uninterrupted schedule is
    assert scheduled_lrs(peaks, warmup, steps, done=57) == rates[57:]


def test_a_checkpoint_of_the_hand_written_schedule_resumes_on_this_runs_peaks(tmp_path):
    """Checkpoints written before lr_schedule (runs in progress) carry each group's peak as "peak_lr" and the
    decayed rate as "lr": on resume the rate comes from the schedule at the step, never from the file."""
    params = [torch.nn.Parameter(torch.ones(2))]
    old = torch.optim.AdamW([{"params": params, "peak_lr": 1e-3}], lr=1e-3)
    params[0].grad = torch.ones(2)
    old.step()
    old.param_groups[0]["lr"] = 3.3e-4  # what get_lr had set at that step
    tensors, meta = ckpt.optimizer_tensors(old)
    meta = json.loads(json.dumps(meta))
    new = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-3}])
    ckpt.load_optimizer(new, tensors, meta)
    scheduler = ckpt.lr_schedule(new, 10, 110, done=60, min_lr_rate=0.1)
    assert "peak_lr" not in new.param_groups[0] and new.param_groups[0]["initial_lr"] == 1e-3
    assert scheduler.get_last_lr()[0] == pytest.approx(old_get_lr(60, 1e-3, 10, 110))
    torch.testing.assert_close(new.state_dict()["state"][0]["exp_avg"], old.state_dict()["state"][0]["exp_avg"])


def test_snr_floor_keeps_the_noisiest_steps_trained():
    cfg = train.TrainConfig()
    scheduler = DDPMScheduler.from_pretrained("weights/default", subfolder="scheduler")  # the shipped schedule
    t = torch.tensor([0, 250, 500, 900, 999])
    plain = train.snr_weights(scheduler, t, cfg)
    floored = train.snr_weights(scheduler, t, train.TrainConfig(snr_floor=0.3))
    assert plain[-1] < 0.01 and plain[-2] < 0.1  # v-prediction's Min-SNR: the noisiest steps weigh ~nothing
    assert torch.equal(floored[2:], plain[2:].clamp_min(0.3)) and floored[-1] == 0.3
    assert plain[0] < 0.01 and torch.equal(floored[:2], plain[:2])  # easy steps keep their cap, however low
    eps = train.snr_weights(scheduler, t, train.TrainConfig(prediction_type="epsilon"))
    assert torch.allclose(eps[-2:], torch.ones(2))  # epsilon: hard steps weigh 1 already
    with pytest.raises(ValueError, match="snr_floor"):
        train.TrainConfig(snr_floor=2)


def test_batches_walk_seeded_passes_over_the_data_and_a_resume_reads_on_where_it_stopped():
    from accelerate import Accelerator

    from core.loader import shuffled_loader

    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare_data_loader(shuffled_loader(range(12), 4, 6 * 4, seed=0), device_placement=False)
    seen = [b.tolist() for b in loader]
    flat = sum(seen, [])
    assert len(seen) == 6 and sorted(flat[:12]) == list(range(12)) and sorted(flat[12:]) == list(range(12))
    assert flat[:12] != flat[12:]  # each pass is a fresh permutation
    again = accelerator.prepare_data_loader(shuffled_loader(range(12), 4, 6 * 4, seed=0), device_placement=False)
    assert [b.tolist() for b in accelerator.skip_first_batches(again, 4)] == seen[4:]
    other = accelerator.prepare_data_loader(shuffled_loader(range(12), 4, 6 * 4, seed=1), device_placement=False)
    assert [b.tolist() for b in other] != seen


def test_bad_input_fails_before_any_compute(setup):
    with pytest.raises(ValueError, match="not divisible"):
        train.main(args(setup, setup / "bad", "--steps", "1", "--resolution", "15"))
    with pytest.raises(ValueError, match="caption"):
        train.main(args(setup, setup / "bad", "--steps", "1", "--caption-column", "nope"))
    with pytest.raises(ValueError, match="prediction_type"):
        train.main(args(setup, setup / "bad", "--steps", "1", "--prediction-type", "x0"))


@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_weights(setup):
    out = setup / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train.py", *args(setup, out, "--steps", "2", "--cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own, so a timeout kills torchrun's workers too (they would wait at a barrier forever).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=Path(train.__file__).parent, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, output[-3000:]
    assert "weights identical on all 2 processes" in output
    assert (out / "pipeline" / "unet" / "model.safetensors").is_file()


def test_shapes_data_is_generated_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train.TrainConfig(data="shapes:12", resolution=32)
    calls = []
    fake = lambda out, config, counts: calls.append((config, counts)) or out  # noqa: E731
    monkeypatch.setattr("data.shapes.generate_dataset", fake)
    assert train.resolve_data(cfg) == "cache/shapes_32px_seed0_12"
    assert calls[0][1]["train"] == 12 and calls[0][0].size == 32
    assert train.resolve_data(train.TrainConfig(data="my_folder")) == "my_folder"


def test_each_step_is_logged_to_metrics_jsonl(setup):
    out = setup / "metrics"
    train.main(args(setup, out, "--steps", "2"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["images_per_s"] > 0 for r in rows)
    assert sorted(rows[0]) == ["images_per_s", "loss", "lr", "step"]
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-3)  # warmup 1: 0, then the peak
    state = json.loads((out / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["precision"] == "no"


def test_a_checkpoint_of_the_unfused_optimizer_resumes_on_the_fused_kernel():
    """Checkpoints written before train.py used fused AdamW carry fused=None: the hyperparameters and the
    moments load, the kernel stays this run's, and the next step matches the unfused one."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    old = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        old.step()
    tensors, meta = ckpt.optimizer_tensors(old)
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read back from the checkpoint's file
    meta = json.loads(json.dumps(meta))  # and its state.json
    assert meta["param_groups"][0]["fused"] is None
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    new = torch.optim.AdamW(copies, lr=0.5, weight_decay=0.0, fused=True)
    new.param_groups[0]["lr"] = 0.01  # this run's rate is kept (lr_schedule sets it from the step)
    ckpt.load_optimizer(new, tensors, meta)
    assert new.param_groups[0]["fused"] is True and new.param_groups[0]["weight_decay"] == 0.1
    grads = [torch.randn_like(p) for p in params]
    for opt, ps in ((old, params), (new, copies)):
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(params, copies, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
