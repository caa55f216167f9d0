"""A busy public Space: `python app.py` as a fresh process, 16 concurrent clients, 1,000 requests.

    python -m benchmarks.server                          # writes the "server" section of BENCHMARKS.md
    python -m benchmarks.server --requests 200 --quick   # fewer requests, prints only

Each client is a person with a tab of their own (a gradio_client session): they generate (the app's defaults:
4 images, 20 steps, guidance 4, layout guidance), then explore the maps of their run (word maps of a layer or
timestep bin, where a pixel looked) and now and then export them, in a seeded random mix. Measured from the
clients: seconds from sending a request to its answer, queueing included (what a person waits), per endpoint
and over all, as p50 / p90 / p99. Measured on the server: resident memory of the app's process (VmRSS; its peak
VmHWM) and the bytes in its Gradio cache folder, sampled every 0.5 s. The app runs with its default settings
(diffusion.serving.Settings: the cache's 30-minute TTL, 20 export zips, a 1 GB maps budget, a queue of 32): what an
operator gets without setting anything.

The model is --model (default: the shipped weights/default).
"""

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import write_section

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle above a blue square", "two yellow triangles", "a small green square to the left of a "
           "purple circle", "a large orange star", "a blue circle and a red square"]
# How people mix their requests: a generate, then mostly explorer re-renders, an export now and then.
MIX = {"attention": 5, "self_attention": 2, "generate": 2, "export_maps": 1}
NO_MAPS = "No maps in this session"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_bytes(folder: Path) -> int:
    """Bytes on disk under a folder (files and folders, as du counts them); files may vanish meanwhile."""
    total = 0
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def percentiles(seconds: list[float]) -> tuple[float, float, float]:
    """p50, p90, p99 (linear interpolation between the nearest ranks, as numpy's default)."""
    cuts = statistics.quantiles(seconds, n=100, method="inclusive") if len(seconds) > 1 else seconds * 99
    return cuts[49], cuts[89], cuts[98]


class Server:
    """`python app.py` in a process of its own, with its own Gradio cache folder; a thread samples its memory
    and its cache's size."""

    def __init__(self, model: str, timeout_s: float = 300):
        self.cache = Path(tempfile.mkdtemp(prefix="bench-server-"))
        self.port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "GRADIO_TEMP_DIR": str(self.cache)}
        env = {k: v for k, v in env.items() if not k.startswith("APP_")}  # the defaults
        self.proc = subprocess.Popen([sys.executable, "app.py", "--model", model, "--port", str(self.port)],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with code {self.proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise TimeoutError(f"app.py did not answer within {timeout_s} s")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.samples: list[tuple[float, int, int]] = []  # (seconds, RSS, cache bytes)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append((time.monotonic() - self._t0, memory(self.proc.pid)[0], folder_bytes(self.cache)))

    def close(self) -> dict[str, float]:
        """Stop; returns the figures (MB): RSS at the end and its peak, cache at the end and its peak."""
        self._stop.set()
        self._sampler.join()
        rss, peak_rss = memory(self.proc.pid)
        cache = folder_bytes(self.cache)
        self.proc.terminate()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.cache, ignore_errors=True)
        mb = 2**20
        return {"rss_end": rss / mb, "rss_peak": peak_rss / mb, "cache_end": cache / mb,
                "cache_peak": max([c for _, _, c in self.samples] + [cache]) / mb}


def person(url: str, requests: int, seed: int, lock: threading.Lock, counter: list[int], total: int):
    """One client session: a generate first, then the mix; returns [(endpoint, seconds, outcome)]."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    rng = random.Random(seed)
    client = Client(url, verbose=False, download_files=False)
    done, has_maps = [], False
    for _ in range(requests):
        with lock:  # the clients share one total: the run ends after `total` requests
            if counter[0] >= total:
                break
            counter[0] += 1
        kind = rng.choices(list(MIX), list(MIX.values()))[0] if has_maps else "generate"
        kwargs = {
            "generate": {"prompt": rng.choice(PROMPTS), "seed": rng.randrange(10_000), "randomize_seed": False},
            "attention": {"image": rng.randrange(4), "layer": "all", "time_bin": rng.randrange(5)},
            "self_attention": {"image": rng.randrange(4), "pixel_y": rng.randrange(16), "pixel_x": rng.randrange(16)},
            "export_maps": {},
        }[kind]
        t0 = time.perf_counter()
        try:
            client.predict(**kwargs, api_name=f"/{kind}")
            outcome = "ok"
        except AppError as e:  # the session's maps were released (the budget): a person generates again
            if NO_MAPS not in str(e):
                raise
            outcome = "released"
        done.append((kind, time.perf_counter() - t0, outcome))
        has_maps = outcome == "ok"
    return done


def run(model: str, requests: int, clients: int, seed: int = 0) -> tuple[dict, dict, dict]:
    """Serve `requests` requests to `clients` concurrent sessions; returns (latency percentiles per endpoint
    and over all, server figures, counts)."""
    server = Server(model)
    try:
        lock, counter = threading.Lock(), [0]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            jobs = [pool.submit(person, server.url, requests, seed + i, lock, counter, requests)
                    for i in range(clients)]
            results = [r for job in jobs for r in job.result()]
        wall = time.perf_counter() - t0
    finally:
        figures = server.close()
    figures["wall_s"] = wall
    by_kind = defaultdict(list)
    for kind, seconds, _ in results:
        by_kind[kind].append(seconds)
    by_kind["all"] = [s for _, s, _ in results]
    latency = {k: percentiles(v) for k, v in by_kind.items()}
    counts = Counter(kind for kind, _, _ in results)
    counts.update(all=len(results), released=sum(outcome == "released" for *_, outcome in results))
    return latency, figures, counts


def table(latency: dict, figures: dict, counts: dict, requests: int, clients: int, model: str) -> str:
    lines = [
        "## A busy public Space: 1,000 requests from 16 concurrent clients" if (requests, clients) == (1000, 16)
        else f"## A busy public Space: {requests} requests from {clients} concurrent clients",
        "",
        f"`python app.py --model {model}` (default settings) as a fresh process; {clients} gradio_client sessions, "
        "each generating (4 images, 20 steps, the app's defaults) and then exploring its maps in a seeded mix. "
        "Latency is what a client waits, queueing included (one sampling run at a time on 2 cores).",
        "",
        "| endpoint | requests | p50 s | p90 s | p99 s |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in [*MIX, "all"]:
        if kind in latency:
            p50, p90, p99 = latency[kind]
            lines.append(f"| {kind} | {counts[kind]} | {p50:.2f} | {p90:.2f} | {p99:.2f} |")
    lines += [
        "",
        "| server, after the run | value |",
        "|---|---:|",
        f"| resident memory at the end (VmRSS) | {figures['rss_end']:.0f} MB |",
        f"| resident memory, peak (VmHWM) | {figures['rss_peak']:.0f} MB |",
        f"| Gradio cache at the end | {figures['cache_end']:.1f} MB |",
        f"| Gradio cache, peak | {figures['cache_peak']:.1f} MB |",
        f"| explorer requests told their maps were released | {counts['released']} |",
        f"| wall time | {figures['wall_s']:.0f} s |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="weights/default")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="print only; BENCHMARKS.md is left alone")
    args = parser.parse_args(argv)
    latency, figures, counts = run(args.model, args.requests, args.clients)
    body = table(latency, figures, counts, args.requests, args.clients, args.model)
    print(body)
    if not args.quick:
        command = "python -m benchmarks.server" + "".join(
            f" --{k} {getattr(args, k)}" for k in ("model", "requests", "clients")
            if getattr(args, k) != parser.get_default(k))
        write_section("server", body, command)


if __name__ == "__main__":
    main()
