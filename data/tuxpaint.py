"""Tux Paint's stamps as a captioned image folder: real pictures with people's own words, for fine-tuning.

    python -m data.tuxpaint --out cache/tuxpaint            # ~940 captioned pictures, train + heldout
    python -m data.tuxpaint --out cache/tuxpaint100 --n 100 # a deterministic 100-picture subset

The set a person would bring: about a thousand drawings and photos (animals, food, vehicles, plants,
household things, ...) from Debian's `tuxpaint-stamps-default` package, each described in plain
English by the Tux Paint project ("A “Fuji” apple.", "A polar bear.", "A shopping cart."). Nobody here
made them, and no model this project ships was trained on them, so it measures what fine-tuning on
someone's own pictures does (`evaluate.py --retrieval`). Licence: GPL-2 (the package's copyright file is
copied into the folder as LICENSE).

Each stamp's caption is the first line of its `.txt` (the English description; translations follow on
`lang.utf8=` lines). Pictures are PNGs (or SVGs, rendered with cairosvg), flattened onto white and
padded to a square, so nothing of the object is cropped. Dropped: stamps without an English
description, `_mirror` twins, and repeated captions (the first picture by path keeps the caption; a
second picture under the same words could never be told apart). A few pictures per hundred (chosen by
a hash of the path, so the split never changes) go to `heldout/`: captions the fine-tune never sees.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data.debian import load_picture, package_files, square_on_white

PACKAGE = "tuxpaint-stamps-default"
STAMPS = Path("usr/share/tuxpaint/stamps")
HELDOUT_PER_100 = 5


@dataclass(frozen=True)
class Stamp:
    picture: Path  # .png or .svg
    caption: str
    category: str  # top folder: animals, food, vehicles …
    source: str  # path inside the package, for the record


def clean_caption(text: str) -> str:
    """A stamp's English description as a caption: quotation marks and the final full stop dropped, a
    typographic apostrophe made plain ("Grandma's"), whitespace collapsed, case kept (the tokenizer lowercases)."""
    text = re.sub(r"(?<=\w)[’‘](?=\w)", "'", text)
    text = re.sub(r"[“”„\"‘’«»]", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.removesuffix(".").strip()


def find_stamps(stamps: Path) -> tuple[list[Stamp], Counter]:
    """Every stamp with an English description, in path order, and the count of each reason to drop one."""
    dropped: Counter = Counter()
    found: list[Stamp] = []
    seen: set[str] = set()
    for txt in sorted(stamps.rglob("*.txt")):
        base = txt.with_suffix("")
        picture = next((p for p in (base.with_suffix(".png"), base.with_suffix(".svg")) if p.is_file()), None)
        if picture is None:
            dropped["no picture beside the description"] += 1
            continue
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = clean_caption(lines[0]) if lines else ""
        if not re.search(r"[A-Za-z]{2}", caption):
            dropped["no English description"] += 1
            continue
        if caption.lower() in seen:
            dropped["caption repeats another stamp's"] += 1
            continue
        seen.add(caption.lower())
        rel = picture.relative_to(stamps)
        found.append(Stamp(picture, caption, rel.parts[0], str(STAMPS / rel)))
    dropped["picture without a description (mostly _mirror twins)"] = sum(
        1 for p in stamps.rglob("*") if p.suffix in (".png", ".svg") and not p.with_suffix(".txt").is_file())
    return found, dropped


def split_of(stamp: Stamp) -> str:
    """train or heldout, from a hash of the path: stable whatever else is in the folder."""
    h = int(hashlib.sha256(stamp.source.encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PER_100 else "train"


def subset(stamps: list[Stamp], n: int | None) -> list[Stamp]:
    """The first n by a hash of the path: a deterministic mix of every category."""
    if n is None or n >= len(stamps):
        return stamps
    order = sorted(stamps, key=lambda s: hashlib.sha256(("subset:" + s.source).encode()).hexdigest())
    return sorted(order[:n], key=lambda s: s.source)


def write_folder(stamps: list[Stamp], out: Path, size: int, dropped: Counter,
                 heldout: bool = True) -> dict[str, list[dict]]:
    """Write `out/<split>/NNNNN.png` + metadata.jsonl (file_name, text, category, source); returns the rows.
    A picture that fails to decode or render is left out and counted in `dropped`."""
    rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    for stamp in stamps:
        try:
            picture = square_on_white(load_picture(stamp.picture, size=4 * size), size)
        except Exception as err:  # PIL and cairosvg raise many types for a bad file
            dropped[f"picture failed to load ({type(err).__name__})"] += 1
            continue
        split = split_of(stamp) if heldout else "train"
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{len(rows[split]):05d}.png"
        picture.save(folder / name)
        rows[split].append({"file_name": name, "text": stamp.caption, "category": stamp.category,
                            "source": stamp.source})
    for split, split_rows in rows.items():
        if split_rows:
            with (out / split / "metadata.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows)
    return rows


def card(rows: dict[str, list[dict]], dropped: Counter, version: str, command: str) -> str:
    counts = {split: Counter(r["category"] for r in split_rows) for split, split_rows in rows.items()}
    categories = sorted(set(counts["train"]) | set(counts["heldout"]))
    table = "\n".join(f"| {c} | {counts['train'][c]} | {counts['heldout'][c]} |" for c in categories)
    examples = "\n".join(f"- {r['text']}" for r in rows["train"][:: max(1, len(rows["train"]) // 15)][:15])
    drops = "\n".join(f"- {reason}: {n}" for reason, n in dropped.most_common() if n)
    return (
        f"---\nlicense: gpl-2.0\ntask_categories: [text-to-image]\n---\n\n# Tux Paint stamps, captioned\n\n"
        f"Built by `{command}` from Debian's `{PACKAGE}` {version} (GPL-2; see LICENSE). Pictures flattened onto "
        f"white and padded to squares; captions are the stamps' English descriptions.\n\n"
        f"{len(rows['train'])} training and {len(rows['heldout'])} held-out pictures.\n\n"
        f"| category | train | heldout |\n|---|---|---|\n{table}\n\n## Caption examples\n\n{examples}\n\n"
        f"## Dropped\n\n{drops}\n"
    )


def build(out: Path, size: int = 64, n: int | None = None, source: Path | None = None,
          heldout: bool = True) -> dict:
    """Build the folder (from the package, or from an unpacked stamps tree `source`); returns the report."""
    t0 = time.perf_counter()
    if source is None:
        root = package_files(PACKAGE)
        source, version = root / STAMPS, (root / ".complete").read_text()
        license_file = root / "usr/share/doc" / PACKAGE / "copyright"
    else:
        version, license_file = "local copy", None
    stamps, dropped = find_stamps(source)
    stamps = subset(stamps, n)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = write_folder(stamps, out, size, dropped, heldout)
    command = "python -m data.tuxpaint --out " + str(out) + (f" --n {n}" if n else "") + f" --size {size}"
    (out / "README.md").write_text(card(rows, dropped, version, command), encoding="utf-8")
    if license_file is not None and license_file.is_file():
        shutil.copy(license_file, out / "LICENSE")
    report = {"package": PACKAGE, "version": version, "size": size,
              "train": len(rows["train"]), "heldout": len(rows["heldout"]),
              "dropped": dict(dropped), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("cache/tuxpaint"))
    parser.add_argument("--size", type=int, default=64, help="side of the square pictures, in pixels")
    parser.add_argument("--n", type=int, default=None, help="keep a deterministic subset of this many stamps")
    parser.add_argument("--no-heldout", dest="heldout", action="store_false",
                        help="put every picture in train/ (no held-out captions)")
    parser.add_argument("--source", type=Path, default=None,
                        help="an unpacked stamps folder instead of the Debian package")
    args = parser.parse_args(argv)
    report = build(args.out, args.size, args.n, args.source, args.heldout)
    print(f"{args.out}: {report['train']} train + {report['heldout']} heldout pictures in {report['seconds']} s; "
          f"dropped {sum(report['dropped'].values())} ({report['dropped']})")


if __name__ == "__main__":
    main()
