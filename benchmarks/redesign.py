"""Before/after timing of the issue-36 redesign: run from the repository root of either checkout.

    python -m benchmarks.redesign /tmp/old 2  # alternates the old checkout's code and this one's, 2 rounds

Each round runs one fresh process per checkout (order alternating), which times, on the shipped model:
a guided sampling step of 4 images (bf16 and fp32, as each checkout's pipeline calls its U-Net), a training
step (batch 64, forward + backward + AdamW in bf16 autocast, as train.py runs on this CPU) and the
pipeline end to end (4 images, 20 steps, maps on; and with the app's layout guidance).
Prints medians over rounds and new ÷ old ratios.

Timed as CPU time of the process (`time.process_time`) on one thread: on a machine shared with other jobs
wall time measures the neighbours (a 30 ms step took 3 s of wall time while a training run held the cores);
the CPU time a single-threaded process spends is what the code costs, up to cache and memory contention.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import write_section

CHILD = r'''
import copy, json, statistics, sys, time, torch
from unet import UNet
from diffusion.pipeline import TextToImagePipeline
old = not hasattr(__import__("unet"), "AttentionLayer")
torch.set_num_threads(1)
def med(fn, n, warm=1):
    for _ in range(warm): fn()
    ts = []
    for _ in range(n):
        t0 = time.process_time(); fn(); ts.append(time.process_time() - t0)
    return statistics.median(ts)
out = {}
base = UNet.from_pretrained("weights/default/unet").eval()
x4, ctx = torch.randn(4, 3, 32, 32), torch.randn(8, 12, 256)
for name, dtype in (("sampling bf16", torch.bfloat16), ("sampling fp32", torch.float32)):
    net = copy.deepcopy(base).to(dtype)
    x, c = x4.to(dtype), ctx.to(dtype)
    if old:
        def step():
            with torch.inference_mode():
                net(x, torch.full((4,), 500), c, x_repeats=2)
        with net.cache_text():
            out[name] = med(step, 9, 2)
    else:
        from unet.fast import optimize_for_inference
        fast = optimize_for_inference(net)
        def step():
            with torch.inference_mode():
                fast(torch.cat([x, x]), torch.full((8,), 500), c)
        out[name] = med(step, 9, 2)
    print(name, out[name], file=sys.stderr, flush=True)
xb, tb, cb = torch.randn(64, 3, 32, 32), torch.randint(0, 1000, (64,)), torch.randn(64, 12, 256)
for name, ac in (("training bf16 autocast", True),):
    net = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6, fused=True)
    def tstep():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            loss = net(xb, tb, cb).float().square().mean()
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    out[name] = med(tstep, 3, 1)
    print(name, out[name], file=sys.stderr, flush=True)
pipe = TextToImagePipeline.from_pretrained("weights/default")
P = "a red circle above a blue square"
out["pipeline maps on"] = med(lambda: pipe(P, num_images=4, steps=20, seed=0, record_attention=True), 2, 1)
out["pipeline maps on + layout guidance"] = med(lambda: pipe(P, num_images=4, steps=20, seed=0, record_attention=True,
    relation_guidance=50.0, object_guidance=20.0), 2, 0)
print("RESULT " + json.dumps(out))
'''


def run(root: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=root, stdout=subprocess.PIPE, text=True,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(root)})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"{root}: the timing process failed (its stderr is above)")
    return json.loads(line[0][7:])


def main() -> None:
    old, new = Path(sys.argv[1]).resolve(), Path.cwd()
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    results = {"old": [], "new": []}
    for r in range(rounds):
        for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
            t0 = time.perf_counter()
            results[label].append(run(old if label == "old" else new))
            print(label, round(time.perf_counter() - t0), "s", results[label][-1], flush=True)
    lines = ["| measure (CPU time, 1 thread) | before (median) | after (median) | after ÷ before |",
             "|---|---|---|---|"]
    for key in results["old"][0]:
        a = statistics.median(r[key] for r in results["old"])
        b = statistics.median(r[key] for r in results["new"])
        lines.append(f"| {key} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | **{b / a:.3f}** |")
    table = "\n".join(lines)
    print(table)
    body = (f"## The issue-36 redesign against the code before it ({old})\n\n"
            f"{rounds} rounds, a fresh process per checkout and round, order alternating; medians over rounds. "
            "CPU time of one thread (`time.process_time`), because the machine was shared with other jobs.\n\n"
            + table)
    write_section("redesign", body, f"python -m benchmarks.redesign {sys.argv[1]} {rounds}")


if __name__ == "__main__":
    main()
