"""Fine-tune jobs for the app: check someone's captioned pictures, run train.py on them in a background process,
follow the run, stop and resume it, and share what it made. No UI here (app.py's Fine-tune tab is the UI).

    jobs = FineTuneJobs("runs/app", base="weights/default")
    report = jobs.check("pictures.zip")          # or a folder, or a hub dataset id; says what it found
    report = jobs.check("pictures.zip", base="weights/clipart")   # another model to start from
    jobs.start(report.name)                       # python train.py --init weights/default --data … --out runs/app/NAME
    jobs.status(report.name)                      # step, loss curve, ETA, the newest validation grid
    jobs.cancel()                                 # its newest checkpoint stays; jobs.start(name) resumes from it
    jobs.zip_pipeline(name), jobs.push(name, "owner/name", token)

Each run is a folder under the root: job.json (what was checked and the exact command), upload/ (an uploaded zip,
extracted), data/metadata.jsonl (the good rows only, absolute file names: train.py reads no bad file), and what
train.py writes there (metrics.jsonl, samples/, checkpoints/, pipeline/). The run is train.py itself, as a person
runs it, so resuming is re-running the same command. One run at a time per app (two CPU cores); the process is
niced and gets `threads` threads, so the app keeps sampling while it trains. The newest `keep_runs` runs stay.

A top-level module beside train.py, not in diffusion/: it reads data sets (data.loading) and starts train.py.
"""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

ROOT = Path(__file__).resolve().parent
TRAIN_SCRIPT = ROOT / "train.py"
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "description")  # the first one present is read
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Without a run of its own to measure, the estimate uses train.resolve_auto's measurement: a fine-tune of 800 steps
# of 32 pictures took about 10 min on 2 CPU cores (≈ 43 images/s). The job gets one thread of the two: about half.
DEFAULT_IMAGES_PER_S = 20.0
RATE_SOURCE = ("about 20 pictures/s: train.py's measured fine-tune (800 steps of 32 in ~10 min on 2 cores) on one "
               "thread")


class Busy(RuntimeError):
    """A run is already going: its message says whose and when it ends."""


@dataclass
class DataReport:
    """What a check found: the good pictures, the bad ones by name, and what training them will take."""

    name: str
    source: str
    images: int
    skipped: list[str]
    sizes: list[tuple[str, int]]       # ("64x64", count), the commonest first
    caption_column: str
    distinct_captions: int
    steps: int
    batch_size: int
    resolution: int
    seconds: float
    rate_source: str
    example_captions: list[str] = field(default_factory=list)
    base: str = ""                     # the model it starts from (its folder's name)

    def summary(self) -> str:
        """Markdown for the tab."""
        sizes = ", ".join(f"{s} px ({n})" for s, n in self.sizes) or "unknown sizes"
        lines = [f"**{self.images} pictures** ready in *{self.source}*: {sizes}, trained at {self.resolution} px; "
                 f"captions from column `{self.caption_column}` ({self.distinct_captions} distinct, e.g. "
                 + "; ".join(f"“{c}”" for c in self.example_captions) + ").",
                 f"Training: {self.steps} steps of {self.batch_size} pictures, about **{duration(self.seconds)}** "
                 f"on this machine ({self.rate_source})" + (f", starting from the model *{self.base}*." if self.base
                                                            else ".")]
        if self.skipped:
            shown = "\n".join(f"- {s}" for s in self.skipped[:20])
            more = f"\n- … and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else ""
            lines.append(f"**{len(self.skipped)} skipped** (they will not be trained on):\n{shown}{more}")
        return "\n\n".join(lines)


@dataclass
class JobStatus:
    """One run as the tab shows it."""

    name: str
    state: str                          # checked | running | finished | stopped | failed
    step: int = 0
    steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    eta_s: float | None = None
    grid: str | None = None             # the newest validation grid (a PNG path)
    checkpoint: int | None = None       # the newest complete checkpoint's step: where a resume starts
    message: str = ""

    @property
    def resumable(self) -> bool:
        return self.state in ("stopped", "failed", "checked")


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


# -- zips --------------------------------------------------------------------------------------------
def safe_extract(archive: str | Path, dest: Path, max_bytes: int, max_files: int = 50_000) -> Path:
    """Extract a zip into dest, refusing what could write outside it or fill the disk: absolute names, '..',
    links, more than max_files entries, more than max_bytes unpacked (counted as it is written, so a zip that
    lies about its sizes is stopped too). Returns dest. Only plain files are written; nothing is executed or
    unpickled. Raises ValueError naming the problem."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{Path(archive).name} is not a zip file ({e}): zip the folder of pictures and its "
                         "metadata.jsonl or metadata.csv") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise ValueError(f"the zip has {len(infos)} entries; the limit is {max_files}")
        if sum(i.file_size for i in infos) > max_bytes:
            raise ValueError(f"the zip unpacks to more than {max_bytes // 2**20} MB, the limit here")
        dest.mkdir(parents=True, exist_ok=True)
        root, written = dest.resolve(), 0
        for info in infos:
            name = info.filename.replace("\\", "/")
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise ValueError(f"the zip entry {info.filename!r} points outside the folder: refused")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ValueError(f"the zip entry {info.filename!r} is a link: refused")
            if info.is_dir() or not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
                continue
            target = root.joinpath(*parts)
            if not target.resolve().is_relative_to(root):
                raise ValueError(f"the zip entry {info.filename!r} points outside the folder: refused")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        raise ValueError(f"the zip unpacks to more than {max_bytes // 2**20} MB, the limit here")
                    out.write(chunk)
    return dest


def zip_folder(folder: Path, archive: Path) -> Path:
    """folder as archive (a .zip), its files under the folder's name."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path(archive.stem) / path.relative_to(folder))
    tmp.replace(archive)
    return archive


# -- reading a run -------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's lines; a half-written last line (the run is writing it) is left for the next read."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def measured_rate(rows: list[dict]) -> float | None:
    """The median images/s of a run's steps after its first few (which include start-up), or None."""
    rates = sorted(r["images_per_s"] for r in rows[5:] if r.get("images_per_s"))
    return rates[len(rates) // 2] if len(rates) >= 5 else None


def newest_checkpoint(run: Path) -> int | None:
    steps = [int(p.name[5:]) for p in (run / "checkpoints").glob("step_*")
             if p.name[5:].isdigit() and (p / "state.json").is_file()]
    return max(steps, default=None)


class FineTuneJobs:
    """The fine-tune runs of one app, under `root`. Thread-safe: every session's tab calls the same instance.

    base: the pipeline folder each run starts from (train.py --init). threads: the run's OMP threads.
    keep_runs: runs kept on disk (the oldest go first; never the running one). max_upload_mb: the largest
    unpacked upload. allow_local: whether a folder on this machine may be named (off on a public Space).
    extra_args: more train.py arguments for every run (tests: a tiny resolution and batch)."""

    def __init__(self, root: str | Path, base: str | Path, threads: int = 1, keep_runs: int = 5,
                 max_upload_mb: int = 500, allow_local: bool = True, extra_args: tuple[str, ...] = (),
                 python: str = sys.executable):
        self.root, self.base = Path(root).resolve(), Path(base)  # absolute: train.py runs from the repository
        self.threads, self.keep_runs, self.max_upload_mb = threads, keep_runs, max_upload_mb
        self.allow_local, self.extra_args, self.python = allow_local, tuple(extra_args), python
        self._lock = threading.RLock()
        self._process: subprocess.Popen | None = None
        self._current: str | None = None

    # -- checking ----------------------------------------------------------------------------------
    def check(self, source: str | Path, name: str = "", who: str = "", steps: int | None = None,
              base: str | Path | None = None) -> DataReport:
        """Read a zip (an uploaded file's path), a local folder or a hub dataset id; write the run's folder with
        the good rows; say what was found. `base`: the pipeline folder this run starts from (default: the jobs'
        base). Raises ValueError, naming the problem and the fix, when nothing can be trained on."""
        source = str(source).strip()
        if not source:
            raise ValueError("Upload a zip of pictures with a metadata.jsonl (file_name, text), or name a folder.")
        base = Path(base or self.base).resolve()
        if not (base / "unet").is_dir():
            raise ValueError(f"the model to start from, {base}, is not a pipeline folder with a unet/: select a "
                             "model shipped with the app (or one fine-tuned here) and check again.")
        name = self._new_name(name)
        run = self.root / name
        try:
            if source.lower().endswith(".zip") and Path(source).is_file():
                folder = self._data_folder(safe_extract(source, run / "upload", self.max_upload_mb * 2**20))
                shown = Path(source).name
            elif Path(source).expanduser().exists():
                if not self.allow_local:
                    raise ValueError("This app does not read folders on its machine: upload a zip instead.")
                folder, shown = Path(source).expanduser().resolve(), source
            else:
                folder, shown = self._hub_id(source), source
            report = self._check_rows(folder, shown, run, steps, base)
        except Exception:
            shutil.rmtree(run, ignore_errors=True)
            raise
        job = {"name": name, "who": who or "someone", "created": time.time(), "source": shown, "base": str(base),
               "report": asdict(report), "steps": report.steps, "batch_size": report.batch_size}
        self._write_job(name, job)
        self.clean()
        return report

    def _new_name(self, name: str) -> str:
        name = name.strip() or time.strftime("tune-%Y%m%d-%H%M%S")
        if not NAME.match(name):
            raise ValueError(f"run name {name!r}: use letters, digits, '-', '_' or '.' (at most 64), e.g. my-cats")
        if (self.root / name).exists():
            raise ValueError(f"a run named {name!r} exists already: pick another name")
        return name

    @staticmethod
    def _data_folder(extracted: Path) -> Path:
        """The folder with the metadata file: the zip's top, or its one folder (a zipped folder)."""
        from data.loading import METADATA_NAMES

        metas = sorted((p for n in METADATA_NAMES for p in extracted.rglob(n)), key=lambda p: len(p.parts))
        if not metas:
            raise ValueError("the zip has no metadata.jsonl or metadata.csv: add one with a line per picture, e.g. "
                             '{"file_name": "cat1.png", "text": "a grey cat on a sofa"}')
        return metas[0].parent if len(metas) == 1 else extracted

    @staticmethod
    def _hub_id(source: str) -> str:
        if not re.match(r"^[\w.-]+/[\w.-]+$", source):
            raise ValueError(f"{source!r} is neither a zip, a folder here, nor a hub dataset id like 'owner/name'")
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise ValueError(f"The Hugging Face Hub can't be reached from this machine (it runs offline), so the "
                             f"dataset {source!r} can't be downloaded: upload a zip of the pictures instead.")
        return source

    def _check_rows(self, folder: Path | str, shown: str, run: Path, steps: int | None, base: Path) -> DataReport:
        """Every row checked with data.loading (a caption-less row or an unreadable picture is named and left
        out); the good ones written to run/data/metadata.jsonl with absolute file names."""
        from data.loading import CaptionedImages, LoadConfig, load_table

        try:
            table = load_table(folder)
        except (ValueError, FileNotFoundError) as e:
            message = str(e)
            if "could not load hub dataset" in message:
                message = (f"The Hugging Face Hub can't be reached from this machine, or has no dataset {shown!r} "
                           f"({message.split('(', 1)[-1].split(')')[0]}): upload a zip of the pictures instead.")
            raise ValueError(message) from e
        column = next((c for c in CAPTION_COLUMNS if c in table.column_names), None)
        if column is None:
            raise ValueError(f"no caption column in {shown} (columns: {table.column_names}): name the captions "
                             f"'text' in the metadata file")
        if "image" not in table.column_names:
            raise ValueError(f"no pictures in {shown} (columns: {table.column_names}): each metadata row needs "
                             "'file_name', the picture's name relative to the metadata file")
        data = CaptionedImages(table, LoadConfig(caption_column=column, skip_bad=True), source=shown)
        if len(data) == 0:
            raise ValueError(f"none of the {len(table)} rows of {shown} can be trained on: "
                             + "; ".join(data.skipped[:5]))
        (run / "data").mkdir(parents=True, exist_ok=True)
        captions, sizes = [], Counter()
        with open(run / "data" / "metadata.jsonl", "w") as f:
            for row in data.rows:
                value, caption = data.hf[row]["image"], data.hf[row][column]
                path = value.get("path") if isinstance(value, dict) else value
                if not (isinstance(path, str) and Path(path).is_file()):  # embedded (a hub set): write it out
                    path = str(run / "data" / f"{row:06d}.img")
                    Path(path).write_bytes(value["bytes"])
                with Image.open(path) as im:
                    sizes[f"{im.width}x{im.height}"] += 1
                captions.extend([caption] if isinstance(caption, str) else caption)
                f.write(json.dumps({"file_name": str(Path(path).resolve()), "text": caption}) + "\n")
        cfg = self._resolved(len(data), captions, steps, base)
        rate, rate_source = self.images_per_s()
        unique = list(dict.fromkeys(captions))
        return DataReport(name=run.name, source=shown, images=len(data), skipped=[skipped_name(s, folder)
                                                                                  for s in data.skipped],
                          sizes=sizes.most_common(3), caption_column=column, distinct_captions=len(unique),
                          steps=cfg.steps, batch_size=cfg.batch_size, resolution=cfg.resolution,
                          seconds=cfg.steps * cfg.batch_size / rate, rate_source=rate_source,
                          example_captions=unique[:: max(1, len(unique) // 3)][:3],
                          base=base.name if base.name != "pipeline" else base.parent.name)

    def _resolved(self, n_images: int, captions: list[str], steps: int | None, base: Path):
        """train.py's own choice of steps and batch for this folder (resolve_auto), with the tab's --steps."""
        from transformers import CLIPTokenizer

        import train  # heavy (accelerate): only when a check runs
        from unet import UNetConfig

        cfg = train.parse_args(["--init", str(base), "--data", "checked", *self.extra_args,
                                *(["--steps", str(steps)] if steps else [])])
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
        cfg = train.resolve_auto(cfg, n_images, captions, SimpleNamespace(tokenizer=tokenizer))
        base_config = UNetConfig(**json.loads((base / "unet" / "config.json").read_text()))
        resolution = cfg.resolution or train.fine_tune_size(base_config)
        return SimpleNamespace(steps=cfg.steps, batch_size=cfg.batch_size, resolution=resolution)

    def images_per_s(self) -> tuple[float, str]:
        """Pictures a second a run trains here: measured on the newest run with enough steps, else the default."""
        for run in sorted(self._runs(), key=lambda r: -r.get("created", 0)):
            rate = measured_rate(read_metrics(self.root / run["name"] / "metrics.jsonl"))
            if rate:
                return rate, f"{rate:.0f} pictures/s, measured on the run '{run['name']}'"
        return DEFAULT_IMAGES_PER_S, RATE_SOURCE

    # -- running -----------------------------------------------------------------------------------
    def command(self, name: str) -> list[str]:
        job = self._read_job(name)
        run = self.root / name
        base = Path(job.get("base") or self.base).resolve()  # no "base": a job.json from before runs had their own
        cmd = [self.python, str(TRAIN_SCRIPT), "--init", str(base), "--data", str(run / "data"),
               "--out", str(run), "--steps", str(job["steps"]), *self.extra_args]
        nice = shutil.which("nice")  # the app's sampling comes first
        return [nice, "-n", "10", *cmd] if nice else cmd

    def start(self, name: str, who: str = "") -> str:
        """Start (or resume: the same command) the run; raises Busy when one is going, ValueError when the run
        is unknown or done."""
        with self._lock:
            running = self._running_job()
            if running:
                raise Busy(self._busy_message(running))
            job = self._read_job(name)
            run = self.root / name
            if (run / "pipeline" / "unet").is_dir():
                raise ValueError(f"the run {name!r} has finished: its model is in the Model selector")
            env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
                   "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
            with open(run / "train.log", "a") as log:
                process = subprocess.Popen(self.command(name), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            resumed = newest_checkpoint(run)
            job.update(pid=process.pid, started=time.time(), who=who or job.get("who", "someone"),
                       start_step=resumed or 0, exit_code=None, cancelled=False)
            self._write_job(name, job)
            self._process, self._current = process, name
        return f"Resumed '{name}' from step {resumed}." if resumed else f"Started '{name}'."

    def cancel(self) -> str:
        """Stop the running run (its process group: SIGTERM, then SIGKILL after 10 s). Its newest checkpoint
        stays, and start(name) resumes from it."""
        with self._lock:
            if self._running_job() is None:
                return "No fine-tune is running."
            process, name = self._process, self._current
            job = self._read_job(name)
            job["cancelled"] = True
            self._write_job(name, job)
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        step = newest_checkpoint(self.root / name)
        kept = f"its checkpoint at step {step} is kept: Resume continues from there" if step else \
            "it had written no checkpoint yet: Resume starts it again"
        return f"Stopped '{name}'; {kept}."

    def _running_job(self) -> dict | None:
        with self._lock:
            self._adopt()
            if self._process is not None and self._process.poll() is None:
                return self._read_job(self._current)
        return None

    def _adopt(self) -> None:
        """After an app restart, a run the last app started may still be training (its own session: the app's end
        did not stop it). Such a run, found by its pid and a command line that names its folder, is this app's
        running run: no second one starts beside it, and Cancel stops it."""
        if self._process is not None and self._process.poll() is None:
            return
        for job in self._runs():
            if job.get("pid") and training(job["pid"], self.root / job["name"]):
                self._process, self._current = Adopted(job["pid"]), job["name"]
                return

    def _busy_message(self, job: dict) -> str:
        status = self.status(job["name"])
        eta = ""
        if status.eta_s is not None:
            ends = time.strftime("%H:%M", time.localtime(time.time() + status.eta_s))
            eta = f", ends in about {duration(status.eta_s)}, around {ends}"
        return (f"One fine-tune at a time on this machine: '{job['name']}' by {job.get('who', 'someone')} is running "
                f"(started {time.strftime('%H:%M', time.localtime(job['started']))}, step {status.step} of "
                f"{status.steps}{eta}). Try again when it is done.")

    def running(self) -> str | None:
        """The name of the run training now, or None."""
        job = self._running_job()
        return job["name"] if job else None

    def busy(self) -> str | None:
        """Who is fine-tuning now, and until when; None when the machine is free."""
        with self._lock:
            job = self._running_job()
        return self._busy_message(job) if job else None

    # -- following ---------------------------------------------------------------------------------
    def status(self, name: str) -> JobStatus:
        job = self._read_job(name)
        self._running_job()  # adopts a run the last app left training
        run = self.root / name
        rows = read_metrics(run / "metrics.jsonl")
        # a resumed run writes again the steps after its checkpoint: the last line of a step wins
        losses = sorted({r["step"]: r["loss"] for r in rows if isinstance(r.get("loss"), int | float)}.items())
        step = rows[-1]["step"] if rows else 0
        grids = sorted((run / "samples").glob("step_*.png"))
        st = JobStatus(name, "checked", step, job["steps"], losses, grid=str(grids[-1]) if grids else None,
                       checkpoint=newest_checkpoint(run))
        running = self._current == name and self._process is not None and self._process.poll() is None
        if (run / "pipeline" / "unet").is_dir() and not running:
            st.state, st.message = "finished", f"Finished: {job['steps']} steps."
        elif running:
            rate = measured_rate(rows[job.get("start_step", 0):]) or (rows[-1]["images_per_s"] if rows else None)
            st.state = "running"
            st.eta_s = (job["steps"] - step) * job["batch_size"] / rate if rate else None
            st.message = f"Training: step {step} of {job['steps']}" + (
                f", about {duration(st.eta_s)} left." if st.eta_s is not None else " (starting up).")
        elif "pid" in job:
            code = self._process.returncode if self._current == name and self._process else None
            if job.get("cancelled") or code in (None, -signal.SIGTERM, -signal.SIGKILL):
                st.state = "stopped"
                st.message = f"Stopped at step {step}" + (f"; Resume continues from the checkpoint at step "
                                                          f"{st.checkpoint}." if st.checkpoint else ".")
            else:
                st.state = "failed"
                st.message = f"train.py stopped with an error (exit code {code}):\n\n```\n{self.log_tail(name)}\n```"
        else:
            st.message = "Checked, not started."
        return st

    def log_tail(self, name: str, lines: int = 15) -> str:
        log = self.root / name / "train.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""

    def pipeline(self, name: str) -> Path | None:
        folder = self.root / name / "pipeline"
        return folder if (folder / "unet").is_dir() and self.status(name).state == "finished" else None

    # -- sharing -----------------------------------------------------------------------------------
    def zip_pipeline(self, name: str) -> Path:
        folder = self.pipeline(name)
        if folder is None:
            raise ValueError(f"the run {name!r} has no finished model yet")
        return zip_folder(folder, self.root / name / "share" / f"{name}.zip")

    def push(self, name: str, repo_id: str, token: str) -> str:
        """Upload the run's model to the Hub as a model repo; a plain message whatever happens."""
        folder = self.pipeline(name)
        if folder is None:
            return f"The run {name!r} has no finished model yet."
        if not re.match(r"^[\w.-]+/[\w.-]+$", repo_id or ""):
            return "Name the repository as owner/name, e.g. alice/my-cats."
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            return ("The Hugging Face Hub can't be reached from this machine (it runs offline): download the zip "
                    "instead.")
        from huggingface_hub import HfApi

        try:
            api = HfApi(token=token or None)
            api.create_repo(repo_id, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"fine-tune '{name}' from the app")
        except Exception as e:  # network, auth, permissions: all "it did not go up", said plainly
            return f"Could not push to the Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
        return f"Pushed to https://huggingface.co/{repo_id}"

    # -- bookkeeping -------------------------------------------------------------------------------
    def runs(self) -> list[str]:
        """Run names, the newest first."""
        return [r["name"] for r in sorted(self._runs(), key=lambda r: -r.get("created", 0))]

    def _runs(self) -> list[dict]:
        found = []
        for path in self.root.glob("*/job.json") if self.root.is_dir() else []:
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return found

    def clean(self) -> list[str]:
        """Delete the oldest runs past keep_runs (never the running one); returns their names."""
        with self._lock:
            keep = self._current if self._running_job() else None
        old = [n for n in self.runs()[self.keep_runs:] if n != keep]
        for name in old:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return old

    def _read_job(self, name: str) -> dict:
        if not (isinstance(name, str) and NAME.match(name) and (self.root / name / "job.json").is_file()):
            raise ValueError(f"no fine-tune run named {name!r} here: check your pictures first")
        return json.loads((self.root / name / "job.json").read_text())

    def _write_job(self, name: str, job: dict) -> None:
        path = self.root / name / "job.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job, indent=1))
        tmp.replace(path)


def alive(pid: int) -> bool:
    """Whether process pid exists and has not exited: a zombie has, unless its other threads are still exiting
    (the main thread of a killed train.py is a zombie before its torch threads are gone)."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except (OSError, IndexError):
        return False


def training(pid: int, run: Path) -> bool:
    """Whether process pid is alive and a train.py of the run (its command line names the run's folder)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return alive(pid) and str(run).encode() in cmdline and any(a.endswith(b"train.py") for a in cmdline)


class Adopted:
    """The few Popen methods FineTuneJobs uses, for a run another app process started (its exit code is unknown:
    a run that ended without its export counts as stopped)."""

    returncode = None

    def __init__(self, pid: int):
        self.pid = pid

    def poll(self) -> int | None:
        return None if alive(self.pid) else 0

    def wait(self, timeout: float) -> None:
        end = time.time() + timeout
        while alive(self.pid):  # not the command line: it reads empty while the process exits
            if time.time() > end:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.1)


def skipped_name(problem: str, folder: Path | str) -> str:
    """A skipped row's note with the folder's absolute prefix removed: 'cat3.png (row 2): …'."""
    prefix = str(Path(folder).resolve()) + os.sep if Path(str(folder)).exists() else ""
    return problem.replace(prefix, "") if prefix else problem
