"""Repository contracts: Space front matter, pinned requirements, quickstart, import direction."""

import ast
import re
import subprocess
from pathlib import Path

from huggingface_hub import metadata_load

ROOT = Path(__file__).resolve().parent.parent


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: '{line}' is not pinned exactly (use name==version)"
            out[name.lower().replace("_", "-")] = version
    return out


def test_space_front_matter_matches_requirements():
    meta = metadata_load(ROOT / "README.md")
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == pins(ROOT / "requirements.txt")["gradio"]
    assert meta["app_file"] == "app.py"
    assert meta["python_version"] == "3.11"
    assert meta["license"] and meta["title"] and 0 < len(meta["short_description"]) <= 60


def test_requirements_are_exact_pins_of_the_stack():
    req = pins(ROOT / "requirements.txt")
    for name in ["torch", "transformers", "diffusers", "accelerate", "gradio", "safetensors", "datasets",
                 "huggingface-hub"]:
        assert name in req, f"requirements.txt misses {name}"
    assert req["torch"] == "2.13.0"  # the local CPU wheel; an unpinned torch pulls GBs of CUDA
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()
    pins(ROOT / "requirements-dev.txt")


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


PROJECT = {"unet", "conditioning", "core", "diffusion", "data", "app", "train", "evaluate", "benchmarks", "tests",
           "finetune_jobs", "pretrain_clip"}


def imported_packages(package: str) -> set[tuple[str, str]]:
    """(file, top-level package) for every absolute import in a project package, lazy ones inside functions too."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found |= {(path.relative_to(ROOT).as_posix(), n.split(".")[0]) for n in names}
    return found


def project_imports(package: str) -> set[tuple[str, str]]:
    return {(f, n) for f, n in imported_packages(package) if n in PROJECT}


def imported_project_packages(package: str) -> set[str]:
    return {n for _, n in project_imports(package)}


def test_import_direction():
    # ARCHITECTURE.md: core (precision, checkpoints, the batch loader) and unet import nothing of the project.
    assert imported_project_packages("core") <= {"core"}
    assert imported_project_packages("unet") <= {"unet"}
    # conditioning: only itself and core -- not unet, not diffusion (which imports it), not data (the CLIP
    # trainer, which reads data sets, is the top-level pretrain_clip.py, beside train.py)
    assert imported_project_packages("conditioning") <= {"conditioning", "core"}
    # diffusion reads a grammar it is told about (diffusion/grammar.py, a model's captions.json), never a data set
    assert imported_project_packages("diffusion") <= {"diffusion", "conditioning", "unet", "core"}
    # the UI is app.py's: what diffusion draws and says about a model serves any front end
    assert "gradio" not in {n for _, n in imported_packages("diffusion")}
    # benchmarks time the product's code: train.py as a process (as a user runs it), never the tests' helpers;
    # the seed's blocks they compare against live in benchmarks/seed_blocks.py
    assert not imported_project_packages("benchmarks") & {"tests", "train"}
    # the app's fine-tune jobs read data sets and run train.py, but draw nothing: no UI library
    tree = ast.parse((ROOT / "finetune_jobs.py").read_text())
    jobs = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names} | {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "gradio" not in jobs and not jobs & {"app", "tests"}


def test_no_pickles_tracked():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert [p for p in tracked if Path(p).suffix in {".pt", ".pth", ".ckpt", ".bin", ".pkl"}] == []


def test_readme_unet_snippet_runs_as_written(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The U-Net in 20 lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves "my-unet"
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["eps"].shape == (2, 3, 32, 32)
    assert namespace["store"].mean("up.1.2.cross_attn").shape == (1, 256, 7)
    assert namespace["store"].head_mean("up.1.2.cross_attn").shape == (1, 4, 256, 7)
