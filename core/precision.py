"""Which floating-point type to run in, chosen from the hardware at run time: the one decision, for sampling
(`inference_dtype`) and for training under accelerate (`mixed_precision`).

On a CPU with AVX-512 BF16 or AMX, bf16 convolutions and matmuls run 2–2.5× faster than fp32; on a CPU
without them bf16 is 2–38× *slower* (PITFALLS.md), and fp16 on any CPU is ~60× slower. A Space's CPU
model is not documented, so the choice is made from /proc/cpuinfo, never assumed.
"""

import platform
import re
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or "unknown CPU")


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU flags include avx512_bf16 or amx_bf16 (Linux /proc/cpuinfo; False elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo))


def inference_dtype(device: torch.device | str, requested: str = "auto") -> torch.dtype:
    """The dtype to sample in: `requested` ("fp32", "bf16", "fp16") or, for "auto", the fastest safe one
    on `device`: bf16 on a GPU that supports it (else fp16), bf16 on a CPU with fast bf16, else fp32."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype {requested!r}: choose auto, {', '.join(DTYPES)}.")
        if requested == "fp16" and torch.device(device).type == "cpu":
            raise ValueError("fp16 on a CPU is ~60× slower than fp32 and can overflow: use bf16 or fp32.")
        return DTYPES[requested]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def mixed_precision(cpu: bool = False) -> str:
    """accelerate's `mixed_precision` for training: bf16 on a GPU that supports it (else fp16), bf16 on a CPU
    with fast bf16, else "no" (fp32). `cpu`: the run stays on the CPU even where a GPU is present."""
    if torch.cuda.is_available() and not cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"
