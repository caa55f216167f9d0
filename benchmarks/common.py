"""Shared measuring tools: interleaved median timing, peak memory, machine description, and the
BENCHMARKS.md writer (each benchmark owns one marked section, so they can be re-run separately)."""

import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from core.precision import cpu_name
from unet import UNet
from unet.fast import optimize_for_inference

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine_line() -> str:
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", text)]
        flags = f", flags: {' '.join(found) or 'no avx512'}"
    except OSError:
        pass
    gpu = f", GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads){flags}{gpu}, Python {platform.python_version()}"
    )


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2,
                        budget_s: float = 20.0) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin so machine noise hits all alike.

    Stops early (after at least 3 rounds) once `budget_s` is spent, for the slowest shapes.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for i in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch on the CPU during one call of fn, above what was live before.

    CPU tensors have no max_memory_allocated(); the profiler's memory events (+alloc / −free, in
    time order) give the same high-water mark.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def write_section(name: str, body: str, command: str) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    stamp = time.strftime("%Y-%m-%d")
    section = f"{begin}\n{body.rstrip()}\n\nMade on {stamp} by `{command}` on {machine_line()}.\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else (
        "# Benchmarks\n\nEvery table is written by the command under it; ratios compare peers measured in the "
        "same run (medians of interleaved repeats; these machines are shared and noisy).\n"
    )
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS_MD.write_text(text)



def as_sampled(net: torch.nn.Module) -> torch.nn.Module:
    """`net` as the pipeline samples with it: our U-Net through `optimize_for_inference` on a CPU (the
    sampling path of unet/fast.py, text side computed once per run), any other model as it is."""
    if isinstance(net, UNet) and next(net.parameters()).device.type == "cpu":
        return optimize_for_inference(net)
    return net
