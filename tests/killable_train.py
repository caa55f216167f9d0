"""Run train.py's main() in this process, pausing at one chosen point so a test can SIGKILL it there.

    python tests/killable_train.py step:3 MARKER -- <train.py arguments>        # before the 3rd step's loss
    python tests/killable_train.py checkpoint:4 MARKER -- <train.py arguments>  # inside step 4's checkpoint write

At the point, it writes MARKER and sleeps; the test waits for MARKER, then kills the process. The pause lives
here, in the test's launcher, so train.py carries no test hooks. A checkpoint pause comes after the checkpoint's
first tensor file is written: the kill leaves a half-written checkpoint behind.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402 (after the path)
from core import checkpoints  # noqa: E402


def pause_here(marker: Path) -> None:
    marker.write_text("paused")
    time.sleep(600)  # the test kills us long before


def main() -> None:
    point, marker, separator, *train_args = sys.argv[1:]
    assert separator == "--", "usage: killable_train.py step:N|checkpoint:N MARKER -- <train.py arguments>"
    kind, n = point.split(":")
    marker, n = Path(marker), int(n)
    if kind == "step":
        real_loss, calls = train.diffusion_loss, [0]

        def loss(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                pause_here(marker)
            return real_loss(*args, **kwargs)

        train.diffusion_loss = loss
    elif kind == "checkpoint":
        real_save, written = checkpoints.save_file, []

        def save_file(tensors, path, *args, **kwargs):
            if Path(path).parent.name == f".tmp_step_{n:06d}":  # step n's checkpoint, being written
                if written:
                    pause_here(marker)
                written.append(path)
            real_save(tensors, path, *args, **kwargs)

        checkpoints.save_file = save_file
    else:
        raise SystemExit(f"unknown pause point {point!r}: use step:N or checkpoint:N")
    train.main(train_args)


if __name__ == "__main__":
    main()
