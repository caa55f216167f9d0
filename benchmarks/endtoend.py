"""What a user feels, and how close to the machine's limits we run.

    python -m benchmarks.endtoend            # writes the "endtoend" section of BENCHMARKS.md
    python -m benchmarks.endtoend --quick    # fewer repeats, prints only

1. End-to-end sampling through TextToImagePipeline: 4 images, 20 DPM++ steps, guidance 4, with maps off
   and on (maps on = recording during sampling + every image's word maps afterwards), in fp32 and in the
   dtype the app picks ("auto": bf16 where this CPU runs it fast). Targets: ≤ 1.5 s with maps; recording
   overhead ≤ 15%. The prompt has a relation between two objects, so the app's default layout guidance
   (relation and object terms) applies to it: its cost is measured too (maps on, guidance on, as the app
   serves it).
2. Cold start: `python app.py` as a fresh process → the first /generate answer (4 images, 20 steps,
   through gradio_client) → the first /attention answer, median of 3 starts. Target: ≤ 10 s to the
   first image. Measured twice: with this interpreter, and in a Space's environment, a virtual
   environment holding exactly requirements.txt (built once into cache/space-env; --no-space-env skips
   it). The two differ: a dev machine often has packages that the libraries import when present
   (diffusers' schedulers import scipy.stats, transformers scipy.optimize, gradio IPython), and a Space
   does not install them.
3. Achieved GFLOP/s of one guided sampling step (4 images under 2 texts each, as the pipeline calls the
   U-Net: the layers before the text at batch 4, the rest at batch 8) and one training step (batch 64, forward +
   backward + fused AdamW, as train.py runs it), FLOPs counted by torch.utils.flop_counter, against this
   machine's matmul peak measured in the same run (2048² matmuls, the faster of torch.mm and oneDNN's matmul).
   Targets: ≥ 70% of peak; bf16 ≥ 2× fp32. The step's convolutions timed alone bound both from above.

The model is --model (default: the shipped weights/default); timings do not depend on its weights.
"""

import argparse
import copy
import functools
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import as_sampled, interleaved_medians, write_section
from core.precision import cpu_has_fast_bf16
from diffusion.layout import OBJECT_GUIDANCE, RELATION_GUIDANCE
from diffusion.pipeline import TextToImagePipeline
from unet.fast import is_channels_last

PROMPT = "a red circle above a blue square"
ROOT = Path(__file__).resolve().parent.parent


def end_to_end(pipe: TextToImagePipeline, repeats: int) -> dict[str, float]:
    """Median seconds per call: 4 images × 20 steps, maps off / on (the app's setting: self-attention at
    one step per timestep bin) / on with self-attention at every step / on with layout guidance (the app's
    relation and object guidance)."""

    def run(maps: bool, self_attention_per_bin: int | None = 1, layout: bool = False):
        result = pipe(PROMPT, num_images=4, steps=20, guidance_scale=4.0, seed=0, record_attention=maps,
                      self_attention_per_bin=self_attention_per_bin,
                      relation_guidance=RELATION_GUIDANCE if layout else 0.0,
                      object_guidance=OBJECT_GUIDANCE if layout else 0.0)
        if maps:
            for i in range(4):
                result.attention.word_maps(i)

    return interleaved_medians({"off": lambda: run(False), "on": lambda: run(True),
                                "on, every step": lambda: run(True, None),
                                "on, layout guidance": lambda: run(True, 1, True)},
                               repeats=repeats, warmup=1, budget_s=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def space_python(venv: Path) -> Path:
    """The interpreter of a virtual environment holding exactly requirements.txt, as a Space installs it.

    Built on first use (a few minutes: pip fetches the pinned wheels) and rebuilt when
    requirements.txt changes; a copy of it inside the venv records what it was built from.
    """
    requirements = (ROOT / "requirements.txt").read_text()
    python, stamp = venv / "bin" / "python", venv / "requirements.txt"
    if not python.exists() or not stamp.exists() or stamp.read_text() != requirements:
        print(f"building a Space-like environment in {venv} (pip install -r requirements.txt) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements.txt")], check=True)
        stamp.write_text(requirements)
    return python


def cold_start(model: str, python: Path | str = sys.executable, timeout_s: float = 120) -> dict[str, float]:
    """Seconds from spawning `python app.py` to the first served images, and to their first maps."""
    from gradio_client import Client

    port = free_port()
    # PYTHONDONTWRITEBYTECODE (set on these machines) is kept: a fresh Space has no bytecode cache of
    # the project's modules either.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(python), "app.py", "--model", model, "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with code {proc.returncode} before serving")
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"app.py did not answer within {timeout_s} s")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        listening = time.perf_counter() - t0
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict(prompt=PROMPT, steps=20, guidance=4.0, seed=0, randomize_seed=False, num_images=4,
                       api_name="/generate")
        first_image = time.perf_counter() - t0
        client.predict(image=0, layer="all", time_bin=0, api_name="/attention")
        first_maps = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"listening": listening, "first_image": first_image, "first_maps": first_maps}


def cold_starts(model: str, python: Path | str, runs: int) -> dict[str, float]:
    """Median over `runs` fresh starts of each cold_start() time."""
    results = [cold_start(model, python) for _ in range(runs)]
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def matmul_peaks(dtype: torch.dtype, repeats: int, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of an n×n×n matmul by each CPU matmul kernel PyTorch runs: torch.mm (MKL's sgemm for fp32 on
    x86, oneDNN for bf16) and, where this build has it, oneDNN's matmul called directly (the kernel behind
    inductor's packed linear). The machine's practical peak is the faster: on an AVX-512 Zen 4 host oneDNN
    ran fp32 at 1.1-1.2x torch.mm's rate, and the U-Net's own oneDNN convolutions beyond torch.mm's."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    fns = {"torch.mm": lambda: torch.mm(a, b)}
    weight = b.t().contiguous()  # linear(a, weight) = a @ b
    try:
        torch.testing.assert_close(torch.ops.mkldnn._linear_pointwise(a[:64], weight, None, "none", [], ""),
                                   torch.mm(a[:64], b), rtol=2e-2, atol=2e-1 * n**0.5)
        fns["oneDNN matmul"] = lambda: torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError, AssertionError):
        pass  # a build without oneDNN, or one whose op refuses this dtype: torch.mm alone
    seconds = interleaved_medians(fns, repeats=repeats, budget_s=15)
    return {k: 2 * n**3 / s / 1e9 for k, s in seconds.items()}


def convolution_flops(outputs: int, weight_shape: torch.Size) -> int:
    """FLOPs of a convolution's forward: 2 × each output's multiply-adds (C_in / groups · kh · kw)."""
    return 2 * outputs * weight_shape[1:].numel()


def timed_alone(runs: list[tuple[Callable[[], object], int]], repeats: int) -> tuple[int, float, float]:
    """(calls, GFLOP, GFLOP/s) of (function, FLOPs) pairs, each function timed alone (its median)."""
    flops = sum(f for _, f in runs)
    seconds = sum(interleaved_medians({"run": fn}, repeats=repeats, budget_s=2)["run"] for fn, _ in runs)
    return len(runs), flops / 1e9, flops / seconds / 1e9


def convolution_throughput(step, repeats: int) -> tuple[int, float, float]:
    """(calls, GFLOP, GFLOP/s) of the convolutions one call of `step` runs, each timed alone on a copy of the input
    it got (same shape, dtype and layout, so the same oneDNN kernel): the rate of the step's densest work
    without the rest around it, an upper bound for the step's own."""
    calls = []

    def keep(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            calls.append((module, args[0].clone(), output.numel()))

    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        step()
    finally:
        handle.remove()
    with torch.inference_mode():
        return timed_alone([(functools.partial(conv, x), convolution_flops(outputs, conv.weight.shape))
                            for conv, x, outputs in calls], repeats)


class _RecordConvolutions(TorchDispatchMode):
    """Records what each convolution a step runs was called with (shapes, dtype, layout, parameters; not the
    tensors). Below autograd and autocast, so it sees every one, F.conv2d's included, in the dtype it ran in."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            x, weight, bias, *params = args
            self.calls.append((x.shape, x.dtype, is_channels_last(x), weight.shape, bias is not None, params,
                               out.shape))
        return out


def _convolution_forward_backward(x, weight, bias, params, grad) -> None:
    torch.ops.aten.convolution(x, weight, bias, *params).backward(grad)
    for t in (x, weight, bias):
        if t is not None:
            t.grad = None


def training_convolution_throughput(step, repeats: int) -> tuple[int, float, float]:
    """(calls, GFLOP, GFLOP/s) of the convolutions one training step runs, forward and backward (the input's and the
    weight's gradients), each timed alone on random tensors of the shapes, dtype and layout it ran with: the
    rate of a training step's densest work without the rest, an upper bound for the step's own. Recorded
    below autograd, so the convolutions called through F.conv2d (upsampling's phase weights, a projected
    skip's conv2) count too."""
    record = _RecordConvolutions()
    with record:
        step()
    runs = []
    for x_shape, dtype, channels_last, w_shape, has_bias, params, out_shape in record.calls:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(x_shape, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
        weight = torch.randn(w_shape, dtype=dtype, requires_grad=True)
        bias = torch.randn(w_shape[0], dtype=dtype, requires_grad=True) if has_bias else None
        grad = torch.randn(out_shape, dtype=dtype)
        runs.append((functools.partial(_convolution_forward_backward, x, weight, bias, params, grad),
                     3 * convolution_flops(out_shape.numel(), w_shape)))  # forward, and two gradients as large
    return timed_alone(runs, repeats)


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_throughput(unet: torch.nn.Module, repeats: int, bf16: bool = True) -> tuple[dict, dict]:
    """(GFLOP per call, GFLOP/s achieved) for sampling and training steps in fp32 and, with bf16, in bf16; and
    (calls, GFLOP, GFLOP/s) of each step's convolutions timed alone (`convolution_throughput`,
    `training_convolution_throughput`)."""
    ctx_len, D = 12, unet.config.context_dim
    S = unet.config.sample_size
    out = {}
    fp32 = copy.deepcopy(unet).float().eval()
    half = copy.deepcopy(unet).to(torch.bfloat16).eval() if bf16 else None
    x, t, ctx = torch.randn(8, 3, S, S), torch.full((8,), 500), torch.randn(8, ctx_len, D)

    def sample_step(model, dtype):  # a guided step of 4 images as the pipeline calls it: [x; x] under 2 texts
        xd, ctxd = x.to(dtype), ctx.to(dtype)  # the same text tensor at every call, so its side stays cached

        def fn():
            with torch.inference_mode():
                return model(xd, t, ctxd)
        return fn

    plain = {"sampling fp32": sample_step(fp32, torch.float32)}
    sampling = {"sampling fp32": sample_step(as_sampled(fp32), torch.float32)}
    if bf16:
        plain["sampling bf16"] = sample_step(half, torch.bfloat16)
        sampling["sampling bf16"] = sample_step(as_sampled(half), torch.bfloat16)
    # FLOPs counted on the plain model (FlopCounterMode does not see oneDNN's packed convolution, which the
    # timed fast path runs); the fast path computes the text side once per run, so the per-step FLOPs counted
    # here include the context refiner's and the keys' and values' projections (a few MFLOP).
    flops = {k: counted_flops(fn) for k, fn in plain.items()}
    times = interleaved_medians(sampling, repeats=repeats, budget_s=30)
    convs = {k: convolution_throughput(fn, repeats) for k, fn in sampling.items()}
    out.update({k: (flops[k] / 1e9, flops[k] / times[k] / 1e9) for k in sampling})

    xb, tb, cb = torch.randn(64, 3, S, S), torch.randint(0, 1000, (64,)), torch.randn(64, ctx_len, D)
    train_net = copy.deepcopy(unet).float().train()
    opt = torch.optim.AdamW(train_net.parameters(), lr=1e-6, fused=True)  # as train.py steps on a CPU

    def train_step(autocast: bool):
        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = train_net(xb, tb, cb).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    training = {"training fp32": train_step(False)}
    if bf16:
        training["training bf16 autocast"] = train_step(True)
    flops = {k: counted_flops(fn) for k, fn in training.items()}
    times = interleaved_medians(training, repeats=max(3, repeats // 3), warmup=1, budget_s=60)
    convs.update({k: training_convolution_throughput(fn, max(3, repeats // 3)) for k, fn in training.items()})
    out.update({k: (flops[k] / 1e9, flops[k] / times[k] / 1e9) for k in training})
    return out, convs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="weights/default", help="pipeline folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats; print, do not write BENCHMARKS.md")
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--no-space-env", action="store_true",
                        help="measure the cold start with this interpreter only, not also in a Space-like venv")
    parser.add_argument("--space-env", type=Path, default=ROOT / "cache" / "space-env",
                        help="where the Space-like venv lives (default: %(default)s)")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 7
    torch.set_num_threads(os.cpu_count() or 1)

    lines = ["### 1. Four images, 20 steps, guidance 4 (TextToImagePipeline)", "",
             "Maps on: cross-attention recorded at every step, self-attention at the middle step of each of the "
             "4 timestep bins (the app's setting), then every image's word maps. \"Self-attention every step\" "
             "records it at every step instead. \"Layout guidance\" is maps on plus the app's default relation and "
             f"object guidance (η = {RELATION_GUIDANCE:g} and {OBJECT_GUIDANCE:g}: one more forward and backward pass "
             "of the prompt half at each of the first 3 steps; this prompt has a relation, so the relation term "
             "steers it; \"A and B\" and \"three X\" prompts cost the same, prompts naming one object without a "
             "relation nothing).", "",
             "| U-Net dtype | maps off, s | maps on, s | recording overhead | self-attention every step, s "
             "| its overhead | maps on + layout guidance, s | guidance cost |", "|---|---|---|---|---|---|---|---|"]
    e2e = {}
    fast_bf16 = cpu_has_fast_bf16()
    # Without bf16 instructions "auto" is fp32 (core/precision.py): one row, and no bf16 timings,
    # which would time bf16 emulated in software (2–38× slower), a path nothing here takes.
    for label in ("fp32", "auto") if fast_bf16 else ("fp32",):
        pipe = TextToImagePipeline.from_pretrained(args.model, dtype=label)
        r = end_to_end(pipe, repeats)
        name = f"{label} ({str(pipe.dtype).removeprefix('torch.')})"
        e2e[name] = r
        every, guided = r["on, every step"], r["on, layout guidance"]
        lines.append(f"| {name} | {r['off']:.2f} | **{r['on']:.2f}** | {(r['on'] / r['off'] - 1) * 100:+.0f}% "
                     f"| {every:.2f} | {(every / r['off'] - 1) * 100:+.0f}% | {guided:.2f} "
                     f"| {(guided / r['on'] - 1) * 100:+.0f}% |")
        print(lines[-1], flush=True)
    unet = pipe.unet

    if not args.skip_cold_start:
        runs = 1 if args.quick else 3
        lines += ["", f"### 2. Cold start of `python app.py` (dtype auto, the app's defaults, layout guidance "
                      f"included; median of {runs} starts)", "",
                  "| environment | listening | first 4 images served | first maps served |", "|---|---|---|---|"]
        envs = {"this machine's Python, with everything installed on it": sys.executable}
        if not args.no_space_env:
            envs["a Space's: a venv with exactly requirements.txt"] = space_python(args.space_env)
        for name, python in envs.items():
            c = cold_starts(args.model, python, runs)
            lines.append(f"| {name} | {c['listening']:.1f} s | **{c['first_image']:.1f} s** "
                         f"| {c['first_maps']:.1f} s |")
            print(lines[-1], flush=True)

    kernels = {"fp32": matmul_peaks(torch.float32, repeats * 2)}
    if fast_bf16:
        kernels["bf16"] = matmul_peaks(torch.bfloat16, repeats * 2)
    peaks = {dtype: max(rates.values()) for dtype, rates in kernels.items()}
    steps, convs = step_throughput(unet, repeats * 2, bf16=fast_bf16)
    lines += ["", "### 3. Achieved GFLOP/s against the measured matmul peak", "",
              f"Matmul peak (2048² × 2048, {torch.get_num_threads()} threads; the faster of the matmul kernels, "
              "each kernel's GFLOP/s in parentheses): " + ", ".join(
                  f"{dtype} {peaks[dtype]:.0f} GFLOP/s ("
                  + ", ".join(f"{kernel} {rate:.0f}" for kernel, rate in rates.items()) + ")"
                  for dtype, rates in kernels.items())
              + (f"; bf16 ÷ fp32 {peaks['bf16'] / peaks['fp32']:.2f}×." if fast_bf16 else
                 ". bf16 not measured: this CPU has no bf16 instructions (avx512_bf16, amx_bf16), so the app runs "
                 "in fp32 here."),
              "", "| step | GFLOP per step | GFLOP/s | % of peak |", "|---|---|---|---|"]
    for name, (gflop, rate) in steps.items():
        peak = peaks["bf16" if "bf16" in name else "fp32"]
        lines.append(f"| {name} | {gflop:.2f} | {rate:.0f} | **{rate / peak * 100:.0f}%** |")
    for kind, what in (("sampling", "each timed alone on a copy of its input (the same oneDNN kernel, without the "
                                    "norms, attention and copies around it)"),
                       ("training", "forward and backward (both gradients), each timed alone on random tensors of "
                                    "its shapes")):
        rates = {name: r for name, r in convs.items() if name.startswith(kind)}
        calls, gflop, _ = rates[f"{kind} fp32"]
        lines += ["", f"The {kind} step's {calls} convolutions ({gflop:.2f} of its {steps[kind + ' fp32'][0]:.2f} "
                  f"GFLOP), {what}: " + ", ".join(
                      f"{name.removeprefix(kind + ' ')} {rate:.0f} GFLOP/s "
                      f"({rate / peaks['bf16' if 'bf16' in name else 'fp32'] * 100:.0f}% of the peak)"
                      for name, (_, _, rate) in rates.items())]
        if len(rates) > 1:  # fp32 first, then bf16
            fp32_rate, bf16_rate = (rate for _, _, rate in rates.values())
            lines[-1] += f", bf16 ÷ fp32 {bf16_rate / fp32_rate:.2f}×"
        lines[-1] += (". At those rates they would take " + ", ".join(
            f"{conv_gflop / rate * 1e3:.0f} ms of the {name.removeprefix(kind + ' ')} step's "
            f"{steps[name][0] / steps[name][1] * 1e3:.0f} ms" for name, (_, conv_gflop, rate) in rates.items())
            + f"; the rest of the step does {(1 - gflop / steps[kind + ' fp32'][0]) * 100:.0f}% of its FLOPs.")
    if fast_bf16:
        s32, s16 = steps["sampling fp32"][1], steps["sampling bf16"][1]
        t32, t16 = steps["training fp32"][1], steps["training bf16 autocast"][1]
        lines += ["", f"bf16 ÷ fp32 speed: sampling step {s16 / s32:.2f}×, training step {t16 / t32:.2f}×."]
    table = "\n".join(lines)
    print(table)
    if args.quick:
        return
    body = "## End to end, cold start, and efficiency\n\n" + table
    command = "python -m benchmarks.endtoend " + " ".join(sys.argv[1:] if argv is None else argv)
    write_section("endtoend", body, command.strip())


if __name__ == "__main__":
    main()
