"""Checkpoints for resuming a run: step-named, atomic, safetensors only (no pickles), one scheme for both trainers.

    checkpoints/step_000500/   <name>.safetensors per group of tensors (model, EMA, optimizer moments, ...),
                               anything else the trainer writes (a tokenizer), and state.json -- written last

A folder counts once its state.json is in it, and it is written under a temporary name and renamed, so a run
killed mid-write never leaves a checkpoint that resume would pick. The learning-rate schedule is not stored:
it is a pure function of the step, rebuilt on resume (`lr_schedule`).
"""

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_with_min_lr_schedule_with_warmup

CHECKPOINT = re.compile(r"^step_(\d{6,})$")


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints, oldest first. A folder is finished once state.json is in it (written last)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT.match(p.name))]
    return sorted((s, p) for s, p in found if (p / "state.json").is_file())


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the message names the last good one."""


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep: int,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write root/step_NNNNNN: each group of `tensors` as <name>.safetensors, then `write_extra(folder)` (files
    the trainer keeps beside them, e.g. a grown tokenizer), then `state` as state.json, into a temporary folder
    that is renamed at the end. A write that fails (a full disk) removes its temporary folder and raises
    CheckpointWriteError; older checkpoints are pruned to the newest `keep` only after the new one is in place,
    so the last good one is untouched."""
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    for stale in root.glob(".tmp_step_*"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if write_extra is not None:
            write_extra(tmp)
        for name, group in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = checkpoints(root)
        kept = (f"The last good checkpoint, {last[-1][1]} (step {last[-1][0]}), is intact: free some space and "
                "re-run the same command to resume from it." if last else "No earlier checkpoint was written.")
        raise CheckpointWriteError(f"could not write the step-{step} checkpoint to {root}: {e}. {kept}") from e
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (hyper-parameters)."""
    sd = optimizer.state_dict()
    tensors = {f"{pid}.{key}": value for pid, s in sd["state"].items() for key, value in s.items()
               if torch.is_tensor(value)}
    return tensors, {"param_groups": sd["param_groups"]}


# Kept from the optimizer being loaded into, not taken from the checkpoint: the kernel (fused or not) is this
# run's choice, so an older checkpoint resumes on the fused kernel too; the learning rates are this run's peaks
# (a resumed run may change them), from which `lr_schedule` sets the step's rate.
THIS_RUNS = ("foreach", "fused", "lr")
SCHEDULE_KEYS = ("initial_lr", "peak_lr")  # the schedule's record of the peak (peak_lr: train.py before lr_schedule)


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The inverse of `optimizer_tensors`: moments from `tensors`, hyper-parameters from `meta` (but THIS_RUNS)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [{**{k: v for k, v in saved.items() if k not in SCHEDULE_KEYS},
               **{k: mine[k] for k in THIS_RUNS if k in mine}}
              for saved, mine in zip(meta["param_groups"], optimizer.param_groups, strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def lr_schedule(optimizer: torch.optim.Optimizer, warmup: int, steps: int, done: int = 0,
                min_lr_rate: float = 0.0) -> LambdaLR:
    """transformers' linear warmup then cosine decay to `min_lr_rate` of the peak at `steps`, set at step `done`
    (0 for a fresh run; a resumed run's step), so that the next optimizer step runs at the step's rate.

    Each param group's own "lr" when this is called is its peak: LambdaLR scales every group by the same factor.
    Call it after `load_optimizer` (which keeps this run's peaks) and `scheduler.step()` after each optimizer step.
    """
    for group in optimizer.param_groups:  # LambdaLR resumes from the peak it records as initial_lr
        group.setdefault("initial_lr", group["lr"])
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, steps, min_lr_rate=min_lr_rate,
                                                       last_epoch=done - 1)
