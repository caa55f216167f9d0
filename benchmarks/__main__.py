"""Every benchmark, one after the other; each writes its section of BENCHMARKS.md.

    python -m benchmarks            # attention, U-Net vs diffusers, end to end, models, devices (≈ 18 min, 2 cores)
    python -m benchmarks --quick    # fewer repeats, prints only

Run it on a quiet machine: never while training or tests hold the cores.
"""

import sys

from benchmarks import attention, devices, endtoend, models, unet

if __name__ == "__main__":
    args = sys.argv[1:]
    for bench in (attention, unet, endtoend, models, devices):
        print(f"== {bench.__name__}", flush=True)
        bench.main(args)
