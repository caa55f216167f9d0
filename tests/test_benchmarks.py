"""The benchmark harness's own logic (the timings themselves live in BENCHMARKS.md, not in tests)."""

import subprocess
import sys

import pytest
import torch

from benchmarks import common, endtoend, models


def test_interleaved_medians_runs_every_function_and_returns_medians():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    out = common.interleaved_medians({"a": make("a"), "b": make("b")}, repeats=5, warmup=1)
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    assert calls == {"a": 6, "b": 6}  # 1 warm-up + 5 timed each, round-robin


def test_write_section_replaces_only_its_own_section(tmp_path, monkeypatch):
    md = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(common, "BENCHMARKS_MD", md)
    common.write_section("one", "first body", "cmd one")
    common.write_section("two", "second body", "cmd two")
    common.write_section("one", "new body", "cmd one")
    text = md.read_text()
    assert "new body" in text and "first body" not in text and "second body" in text
    assert text.count("<!-- begin one -->") == 1 and text.index("begin one") < text.index("begin two")


@pytest.fixture
def fake_pip(monkeypatch):
    """Record the venv/pip commands space_python would run, and make the venv's python appear."""
    commands = []

    def run(cmd, check):
        commands.append([str(c) for c in cmd])
        if cmd[1:3] == ["-m", "venv"]:
            python = endtoend.Path(cmd[-1]) / "bin" / "python"
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text("")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(endtoend.subprocess, "run", run)
    return commands


def test_space_env_is_built_once_and_rebuilt_when_requirements_change(tmp_path, fake_pip, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "requirements.txt").write_text("torch==2.13.0\n")
    monkeypatch.setattr(endtoend, "ROOT", root)
    venv = tmp_path / "space-env"

    python = endtoend.space_python(venv)
    assert python == venv / "bin" / "python"
    assert [c[1:3] for c in fake_pip] == [["-m", "venv"], ["-m", "pip"]]
    assert fake_pip[0][0] == sys.executable and fake_pip[1][-1] == str(root / "requirements.txt")

    fake_pip.clear()
    endtoend.space_python(venv)
    assert fake_pip == []  # same requirements: reused

    (root / "requirements.txt").write_text("torch==2.13.0\ngradio==6.31.0\n")
    endtoend.space_python(venv)
    assert [c[1:3] for c in fake_pip] == [["-m", "venv"], ["-m", "pip"]]  # changed: rebuilt
    assert (venv / "requirements.txt").read_text() == (root / "requirements.txt").read_text()


def test_devices_benchmark_measures_train_py_and_the_pipeline_on_the_cpu(tmp_path):
    from benchmarks import devices
    from data.shapes import ShapesConfig, generate_dataset
    from tests.tiny import tiny_pipeline

    data = generate_dataset(tmp_path / "data", ShapesConfig(size=32, seed=0), counts={"train": 8}, workers=1,
                            progress=False)
    tiny_pipeline().save_pretrained(tmp_path / "model")
    rate, precision, hardware = devices.training_rate("cpu", str(tmp_path / "model"), str(data), batch_size=4,
                                                      steps=2, warmup=1, resolution=16, mixed_precision="no")
    assert rate > 0 and precision == "no" and "CPU" in hardware  # as train.py, run as a process, recorded them
    latency, dtype = devices.sampling_latency("cpu", str(tmp_path / "model"), repeats=1)
    assert set(latency) == {"off", "on", "on, every step", "on, layout guidance"}
    assert all(v > 0 for v in latency.values())
    assert dtype in (torch.float32, torch.bfloat16)


def test_devices_benchmark_says_when_there_is_no_gpu(monkeypatch):
    from benchmarks import devices

    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)
    assert devices.devices_present() == ["cpu"]
    with pytest.raises(SystemExit, match="torch sees no GPU"):
        devices.main(["--device", "cuda", "--quick"])


def test_step_throughput_counts_flops_and_leaves_out_bf16_where_the_cpu_has_none():
    from unet import UNet, UNetConfig

    unet = UNet(UNetConfig.preset("tiny"))
    steps, convs = endtoend.step_throughput(unet, repeats=1, bf16=False)  # a CPU without bf16 instructions
    assert set(steps) == {"sampling fp32", "training fp32"}
    assert all(gflop > 0 and rate > 0 for gflop, rate in steps.values())
    assert steps["training fp32"][0] > steps["sampling fp32"][0]  # batch 64 forward + backward vs batch 8
    assert set(convs) == {"sampling fp32", "training fp32"}
    assert all(calls > 0 and 0 < gflop < steps[name][0] and rate > 0 for name, (calls, gflop, rate) in convs.items())
    calls, _, rate = convs["sampling fp32"]
    # the 3×3 and 1×1 convs a step calls as modules (each upsample's conv as its phase conv): some, never
    # more than the U-Net has
    assert 0 < calls <= sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules()) and rate > 0


def test_convolution_throughput_counts_each_call_and_its_multiply_adds(monkeypatch):
    from torch.nn import Conv2d

    net = torch.nn.Sequential(Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), Conv2d(8, 2, 1), Conv2d(2, 2, 3, groups=2))
    x = torch.randn(2, 4, 6, 6)
    seconds = iter([0.5, 0.25, 0.25])  # one median per convolution call, in call order
    monkeypatch.setattr(endtoend, "interleaved_medians", lambda fns, **kw: {k: next(seconds) for k in fns})
    calls, gflop, rate = endtoend.convolution_throughput(lambda: net(x), repeats=1)
    # multiply-adds × 2: 2·6·6·8 outputs × 4·3·3, 2·6·6·2 × 8, 2·4·4·2 × 1·3·3 (grouped, no padding)
    flops = 2 * (2 * 36 * 8 * 36 + 2 * 36 * 2 * 8 + 2 * 16 * 2 * 9)
    assert calls == 3 and gflop == pytest.approx(flops / 1e9) and rate == pytest.approx(flops / 1.0 / 1e9)


def test_training_convolution_throughput_counts_every_convolution_forward_and_backward(monkeypatch):
    conv = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)
    weight = torch.randn(2, 8, 1, 1, requires_grad=True)
    x = torch.randn(2, 4, 6, 6)

    def step():  # a module's convolution and one called through F.conv2d (no bias), as the U-Net's phase convs are
        torch.nn.functional.conv2d(conv(x), weight).square().mean().backward()

    seconds = iter([0.5, 0.5])
    monkeypatch.setattr(endtoend, "interleaved_medians", lambda fns, **kw: {k: next(seconds) for k in fns})
    calls, gflop, rate = endtoend.training_convolution_throughput(step, repeats=1)
    # 3 × (forward multiply-adds × 2): 2·8·3·3 outputs × 4·3·3, then 2·2·3·3 outputs × 8
    flops = 3 * 2 * (2 * 8 * 9 * 36 + 2 * 2 * 9 * 8)
    assert calls == 2 and gflop == pytest.approx(flops / 1e9) and rate == pytest.approx(flops / 1.0 / 1e9)


def test_matmul_peaks_time_torch_mm_and_onednn_where_present():
    rates = endtoend.matmul_peaks(torch.float32, repeats=1, n=64)
    assert "torch.mm" in rates and all(r > 0 for r in rates.values())
    if torch.backends.mkldnn.is_available():
        assert "oneDNN matmul" in rates


def test_devices_benchmark_of_one_device_adds_its_own_section(tmp_path, monkeypatch):
    # A GPU run (--device cuda) must not replace the CPU's table, which another machine wrote.
    from benchmarks import devices

    md = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(common, "BENCHMARKS_MD", md)
    common.write_section("devices", "the CPU's table", "python -m benchmarks.devices")
    latency = {"off": 1.0, "on": 1.1, "on, layout guidance": 1.3}
    monkeypatch.setattr(devices, "sampling_latency", lambda device, model, repeats: (latency, torch.float32))
    monkeypatch.setattr(devices, "training_rate", lambda device, *a, **k: (123.0, "no", "2-core CPU (test)"))
    devices.main(["--device", "cpu"])
    text = md.read_text()
    assert "the CPU's table" in text and "<!-- begin devices-cpu -->" in text
    assert "## Training and sampling on the CPU" in text
    assert "| 2-core CPU (test) | 64 | fp32 | **123** | 1.00 s | **1.10 s** | 1.30 s | float32 |" in text


def test_attention_benchmark_times_ours_in_both_layouts_against_the_seed():
    from benchmarks import attention
    row = attention.measure("cross", 4, 2, 64, 16)  # checks both layouts compute the seed's output
    assert set(row["ms"]) == set(row["mb"]) == {"ours", "ours cl", "seed"}
    assert all(v > 0 for v in row["ms"].values())
    line = attention.table([row]).splitlines()[-1]
    assert line.startswith("| cross | 4 | 2 | 64 | 16 |") and line.count("×") == 4


def test_unet_benchmark_fixed_cost_step_is_one_guided_image_at_8x8(monkeypatch):
    from benchmarks import unet as bench
    shapes, call = [], bench.guided_call

    def recording_call(model, x, t, ctx):
        shapes.append((type(model).__name__, tuple(x.shape), tuple(ctx.shape)))
        return call(model, x, t, ctx)

    monkeypatch.setattr(bench, "guided_call", recording_call)
    ms = bench.sampling_ms(bench.models(), None, repeats=1, batch=2, size=8)
    assert set(ms) == {"ours", "diffusers"} and all(v > 0 for v in ms.values())
    # one image under its two texts, both on the doubled batch; ours on the CPU fast path
    assert set(shapes) == {("FastUNet", (1, 3, 8, 8), (2, 12, 256)),
                           ("UNet2DConditionModel", (1, 3, 8, 8), (2, 12, 256))}


def test_server_percentiles_interpolate_as_numpy_does():
    import numpy as np

    from benchmarks.server import percentiles

    seconds = [0.3, 1.2, 0.7, 5.0, 0.9, 2.2, 0.4]
    assert percentiles(seconds) == pytest.approx(tuple(np.percentile(seconds, [50, 90, 99])))


@pytest.mark.slow  # app.py as a process of its own, and a few dozen requests: ~30 s on 2 cores
def test_server_benchmark_serves_concurrent_sessions_and_measures_the_app_process(tmp_path):
    from benchmarks import server
    from tests.tiny import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "model")
    latency, figures, counts = server.run(str(tmp_path / "model"), requests=24, clients=3)
    assert counts["all"] == 24 and counts["generate"] >= 3  # every session starts with a generate
    assert sum(counts[kind] for kind in server.MIX) == 24
    assert all(0 < p50 <= p90 <= p99 for p50, p90, p99 in latency.values()) and "all" in latency
    assert 100 < figures["rss_end"] <= figures["rss_peak"]  # MB of a process that holds torch and a model
    assert 0 < figures["cache_peak"] and figures["cache_end"] <= figures["cache_peak"]
    text = server.table(latency, figures, counts, 24, 3, "tiny")
    assert "| generate | " in text and "| all | 24 |" in text and "resident memory, peak" in text


def test_models_benchmark_compares_each_model_with_the_first():
    rows = [{"model": "default", "size": 32, "prompt": "a red circle", "params_m": 6.0, "dtype": "torch.bfloat16",
             "2 threads": 1.0, "1 thread": 1.5},
            {"model": "clipart", "size": 64, "prompt": "a cat", "params_m": 5.0, "dtype": "torch.bfloat16",
             "2 threads": 1.5, "1 thread": 3.0}]
    text = models.table(rows)
    assert "| clipart | 64 px | 5.0 M | bfloat16 | \"a cat\" | 1.50 (1.50×) | 3.00 (2.00×) |" in text
    assert "| default | 32 px | 6.0 M | bfloat16 | \"a red circle\" | 1.00 | 1.50 |" in text
