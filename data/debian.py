"""Real captioned pictures from Debian's package archive: fetch a package's files, render its pictures.

The real data sets this project measures on (`data.tuxpaint`, `data.clipart`) come from Debian packages,
which a fresh machine reaches through its own package manager: `apt-get download` fetches the `.deb`
(no install, nothing system-wide changes) and `dpkg -x` unpacks it into a cache folder. Pictures are
flattened onto white and padded to a square, so nothing of the drawn object is cropped away.

    root = package_files("tuxpaint-stamps-default")      # cache/debian/tuxpaint-stamps-default/<version>/
    image = square_on_white(load_picture(root / "usr/share/tuxpaint/stamps/food/fruit/apple.png"), 64)
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

from PIL import Image

CACHE = Path("cache") / "debian"


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def package_files(name: str, cache: Path = CACHE) -> Path:
    """Unpacked files of Debian package `name` (downloaded and unpacked once); returns the unpacked root.

    The version apt offers is recorded in the folder name, so a newer package lands beside an older one
    instead of silently changing a data set built from it.
    """
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not on PATH: the real data sets are fetched from Debian's archive; "
                               "run this on Debian or Ubuntu (or in their container image).")
    version = package_version(name)
    root = cache / name / version
    if (root / ".complete").is_file():
        return root
    download = cache / name / "deb"
    download.mkdir(parents=True, exist_ok=True)
    debs = sorted(download.glob(f"{name}_*.deb"))
    if not debs:
        result = _run(["apt-get", "download", f"{name}={version}"], cwd=download)
        debs = sorted(download.glob(f"{name}_*.deb"))
        if result.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download {name} failed: {result.stderr.strip()[-400:]}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    result = _run(["dpkg", "-x", str(debs[-1].resolve()), str(root)])
    if result.returncode != 0:
        raise RuntimeError(f"dpkg -x {debs[-1]} failed: {result.stderr.strip()[-400:]}")
    (root / ".complete").write_text(version)
    return root


def package_version(name: str) -> str:
    """The candidate version apt would fetch; runs `apt-get update` once if apt does not know the package."""
    for attempt in range(2):
        out = _run(["apt-cache", "policy", name]).stdout
        for line in out.splitlines():
            if line.strip().startswith("Candidate:") and "(none)" not in line:
                return line.split(":", 1)[1].strip()
        if attempt == 0:
            update = _run(["apt-get", "update", "-qq"])
            if update.returncode != 0:
                raise RuntimeError(f"apt does not know {name!r} and `apt-get update` failed (needs root and the "
                                   f"package archive): {update.stderr.strip()[-300:]}")
    raise RuntimeError(f"Debian package {name!r} is not in this machine's package lists.")


def render_svg(path: Path, size: int) -> Image.Image:
    """An SVG drawn with its longer side `size` pixels, as RGBA (transparent where nothing is drawn)."""
    try:
        import cairosvg
    except ImportError as err:
        raise RuntimeError("rendering SVG pictures needs cairosvg: pip install -r requirements-dev.txt") from err
    from defusedxml import EntitiesForbidden

    data = Path(path).read_bytes()
    try:
        return _svg_at_size(cairosvg, data, size, unsafe=False, url=str(path))
    except EntitiesForbidden:
        # Illustrator and old Inkscape files declare their namespaces as XML entities, which cairosvg's
        # safe parser refuses. These files come from Debian's archive, not from a user: parse them with
        # entities allowed, but without a base URL, so no other file is read.
        return _svg_at_size(cairosvg, data, size, unsafe=True, url=None)


def _svg_at_size(cairosvg, data: bytes, size: int, unsafe: bool, url: str | None) -> Image.Image:
    """Width first (cairosvg keeps the aspect ratio when given one side); a portrait picture comes out taller
    than `size` and is drawn again by its height. Never at the SVG's own size: some declare 13,000 px."""
    image = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data, url=url, unsafe=unsafe, output_width=size)))
    if image.height > size:
        image = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data, url=url, unsafe=unsafe, output_height=size)))
    return image.convert("RGBA")


def load_picture(path: Path, size: int = 256) -> Image.Image:
    """A PNG/JPEG (as is) or an SVG (rendered at `size` px) as RGBA."""
    path = Path(path)
    if path.suffix.lower() == ".svg":
        return render_svg(path, size)
    with Image.open(path) as im:
        return im.convert("RGBA")


def square_on_white(image: Image.Image, size: int) -> Image.Image:
    """Composite onto white, pad the shorter side with white to a square, resize to `size` (RGB)."""
    rgba = image.convert("RGBA")
    bbox = rgba.getchannel("A").getbbox()
    if bbox is not None:  # drop empty transparent margins, so the object fills the frame
        rgba = rgba.crop(bbox)
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
