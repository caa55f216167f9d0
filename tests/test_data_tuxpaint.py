"""data.tuxpaint: a stamps tree (as Debian's package unpacks it) becomes a captioned image folder."""

import json

from PIL import Image

from data.loading import LoadConfig, load_captioned
from data.tuxpaint import build, clean_caption, split_of, subset


def stamp(folder, name, caption, size=(40, 20), colour=(200, 30, 30, 255)):
    folder.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", size, (0, 0, 0, 0))  # transparent, as stamps are
    im.paste(colour, (5, 5, size[0] - 5, size[1] - 5))
    im.save(folder / f"{name}.png")
    if caption is not None:
        (folder / f"{name}.txt").write_text(f"{caption}\nfr.utf8=Une traduction.\n", encoding="utf-8")


def test_stamps_become_a_captioned_folder_with_drops_counted(tmp_path):
    src = tmp_path / "stamps"
    stamp(src / "food" / "fruit", "apple", "A “Fuji” apple.")
    stamp(src / "food" / "fruit", "apple_mirror", None)  # a mirrored twin: no description
    stamp(src / "animals" / "mammals", "bear", "A polar bear.", colour=(240, 240, 250, 255))
    stamp(src / "animals" / "mammals", "bear2", "A polar bear.")  # the same words again
    (src / "town").mkdir()
    (src / "town" / "lost.txt").write_text("A description without a picture.")
    out = tmp_path / "folder"
    report = build(out, size=16, source=src, heldout=False)
    assert report["train"] == 2 and report["heldout"] == 0
    assert report["dropped"] == {"caption repeats another stamp's": 1, "no picture beside the description": 1,
                                 "picture without a description (mostly _mirror twins)": 1}
    rows = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["A polar bear", "A Fuji apple"]  # path order, quotes and stop dropped
    assert {r["category"] for r in rows} == {"animals", "food"}
    im = Image.open(out / "train" / rows[1]["file_name"])
    assert im.size == (16, 16) and im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent margins became white padding
    r, g, b = im.getpixel((8, 8))
    assert r > 150 and g < 100  # the red stamp fills the middle: cropped to its content, not squashed
    data = load_captioned(out, LoadConfig(resolution=16))
    assert len(data) == 2 and data[0]["pixel_values"].shape == (3, 16, 16)
    card = (out / "README.md").read_text()
    assert "GPL-2" in card and "A polar bear" in card and "caption repeats another stamp's: 1" in card


def test_splits_and_subsets_are_deterministic():
    from data.tuxpaint import Stamp

    stamps = [Stamp(None, f"thing {i}", "c", f"usr/share/tuxpaint/stamps/c/{i}.png") for i in range(300)]
    splits = [split_of(s) for s in stamps]
    assert splits == [split_of(s) for s in stamps] and 5 <= splits.count("heldout") <= 30
    assert subset(stamps, 50) == subset(list(reversed(stamps)), 50) and len(subset(stamps, 50)) == 50


def test_clean_caption():
    cleaned = clean_caption("  A US 5 cent piece ($.05) called a “nickel.”  ")
    assert cleaned == "A US 5 cent piece ($.05) called a nickel"
    assert clean_caption("Grandma’s old rag doll.") == "Grandma's old rag doll"
    assert clean_caption("The ‘Fuji’ apple.") == "The Fuji apple"
