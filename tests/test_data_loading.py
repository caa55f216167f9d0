"""Loader: a user-style folder (PNG/JPEG + metadata.csv), the generated shapes set, transforms, bad input."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from data.loading import (
    LoadConfig,
    crop_square,
    load_captioned,
    resize_shorter,
    swap_left_right,
    to_tensor,
)
from data.shapes import ShapesConfig, generate_dataset

COLOURS = {"a.png": (255, 0, 0), "b.png": (0, 0, 255), "c.jpg": (255, 255, 0)}


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path_factory, monkeypatch):
    """Keep the metadata tables these tests prepare out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf"))


@pytest.fixture
def user_folder(tmp_path):
    """Three images of different sizes and formats with a CSV of captions, as a person would bring."""
    for (name, colour), size in zip(COLOURS.items(), [(48, 40), (40, 40), (40, 64)], strict=True):
        Image.new("RGB", size, colour).save(tmp_path / name)
    (tmp_path / "metadata.csv").write_text(
        'file_name,caption\na.png,a red thing on the left\nb.png,"blue, plain"\nc.jpg,a yellow photo\n')
    return tmp_path


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "set"
    counts = {"train": 12, "validation": 4, "test": 4, "heldout": 4}
    return generate_dataset(out, ShapesConfig(seed=1), counts, workers=1, progress=False)


def test_user_folder_png_jpeg_csv(user_folder):
    ds = load_captioned(user_folder, LoadConfig(resolution=32, caption_column="caption"))
    assert len(ds) == 3 and ds.skipped == []
    for i in range(3):
        item = ds[i]
        assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
        name = ["a.png", "b.png", "c.jpg"][i]
        expected = torch.tensor(COLOURS[name], dtype=torch.float32) / 127.5 - 1
        torch.testing.assert_close(item["pixel_values"].mean((1, 2)), expected, atol=0.03, rtol=0)
    assert ds[1]["caption"] == "blue, plain"
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and len(batch["caption"]) == 3


def test_images_in_one_subfolder_are_the_train_split(user_folder):
    sub = user_folder / "images"
    sub.mkdir()
    for p in list(user_folder.iterdir()):
        if p.is_file():
            p.rename(sub / p.name)
    ds = load_captioned(user_folder, LoadConfig(caption_column="caption"))
    assert len(ds) == 3 and ds.hf[0]["image"]["path"] == str((sub / "a.png").resolve())


def test_generated_shapes_set_all_splits_and_caption_lists(shapes_folder):
    meta = [json.loads(x) for x in (shapes_folder / "heldout" / "metadata.jsonl").read_text().splitlines()]
    ds = load_captioned(shapes_folder, LoadConfig(split="heldout", caption_column="captions"))
    assert len(ds) == 4
    torch.manual_seed(0)
    for i in range(4):
        item = ds[i]
        assert item["caption"] in meta[item["index"]]["captions"]
        pixels = np.asarray(Image.open(shapes_folder / "heldout" / meta[item["index"]]["file_name"]))
        # 32 px set at resolution 32: no resampling, exact pixels mapped to [-1, 1]
        expected = torch.from_numpy(pixels.copy()).permute(2, 0, 1) / 127.5 - 1  # (3, H, W)
        torch.testing.assert_close(item["pixel_values"], expected)
    picks = {ds[0]["caption"] for _ in range(40)}
    assert picks == set(meta[ds[0]["index"]]["captions"])  # every phrasing gets picked
    assert len(load_captioned(shapes_folder)) == 12  # default split train, caption column "text"


def test_without_picking_an_item_lists_every_phrasing_and_draws_no_random_number(shapes_folder):
    meta = [json.loads(x) for x in (shapes_folder / "train" / "metadata.jsonl").read_text().splitlines()]
    ds = load_captioned(shapes_folder, LoadConfig(caption_column="captions", pick_caption=False))
    state = torch.get_rng_state()
    item = ds[3]
    assert torch.equal(torch.get_rng_state(), state)  # a prefetching loader may fetch it ahead of its step
    assert item["captions"] == meta[item["index"]]["captions"] and "caption" not in item
    plain = load_captioned(shapes_folder, LoadConfig(pick_caption=False))  # a plain string column: a list of one
    assert plain[3]["captions"] == [meta[plain[3]["index"]]["text"]]


def test_regenerated_or_moved_folder_is_not_served_from_a_stale_cache(tmp_path):
    counts = {"train": 4, "validation": 0, "test": 0, "heldout": 0}
    folder = tmp_path / "set"
    for seed in (0, 1):  # same folder, new content: captions must follow the new metadata
        generate_dataset(folder, ShapesConfig(seed=seed), counts, workers=1, progress=False, overwrite=True)
        first = json.loads((folder / "train" / "metadata.jsonl").read_text().splitlines()[0])
        assert load_captioned(folder).hf[0]["text"] == first["text"]
    moved = tmp_path / "moved" / "set"
    moved.parent.mkdir()
    folder.rename(moved)  # same content, new place: image paths must point at the new place
    ds = load_captioned(moved)
    assert ds.hf[0]["image"]["path"].startswith(str(moved.resolve())) and ds[0]["pixel_values"].shape[0] == 3


def test_nested_layout_through_the_imagefolder_builder(tmp_path):
    """Metadata two levels down is not the plain layout: `datasets`' imagefolder infers the splits."""
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "data" / split / f"{i}.png")
        meta = tmp_path / "data" / split / "metadata.csv"
        meta.write_text(f"file_name,text\n0.png,red {split}\n1.png,x\n")
    ds = load_captioned(tmp_path, LoadConfig(split="test", resolution=8))
    assert [ds[i]["caption"] for i in range(2)] == ["red test", "x"]
    assert ds[0]["pixel_values"].shape == (3, 8, 8)
    (tmp_path / "data" / "test" / "metadata.csv").write_text("file_name,text\n0.png,changed\n1.png,x\n")
    assert load_captioned(tmp_path, LoadConfig(split="test"))[0]["caption"] == "changed"  # no stale cache


def test_hflip_swaps_left_and_right_in_caption(user_folder):
    (user_folder / "a.png").unlink()
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 40))  # white stripe on the left
    img.save(user_folder / "a.png")
    plain = load_captioned(user_folder, LoadConfig(caption_column="caption", resolution=40))
    flipping = load_captioned(user_folder, LoadConfig(caption_column="caption", resolution=40, hflip=True))
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        item = flipping[0]
        flipped = item["caption"] == "a red thing on the right"
        assert flipped or item["caption"] == "a red thing on the left"
        expected = plain[0]["pixel_values"].flip(-1) if flipped else plain[0]["pixel_values"]
        torch.testing.assert_close(item["pixel_values"], expected)
        seen.add(flipped)
    assert seen == {True, False}
    assert all(plain[0]["caption"] == "a red thing on the left" for _ in range(10))  # off by default


def test_swap_left_right_words():
    assert swap_left_right("a circle in the top left, left of a Right square") == \
        "a circle in the top right, right of a Left square"
    assert swap_left_right("the leftmost of two; bright light") == "the rightmost of two; bright light"


def test_transforms_resize_crop_range():
    img = Image.fromarray(np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3))
    resized = resize_shorter(img, 30)
    assert resized.size == (40, 30)
    assert crop_square(resized, 30, random=False).size == (30, 30)
    g = torch.Generator().manual_seed(0)
    lefts = set()
    for _ in range(20):
        crop = crop_square(resized, 30, random=True, generator=g)
        assert crop.size == (30, 30)
        lefts.add(np.asarray(crop)[0, 0, 0])
    assert len(lefts) > 3  # random crops really move
    t = to_tensor(Image.new("RGB", (4, 2), (255, 0, 128)))
    assert t.shape == (3, 2, 4)
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))


# ----------------------------------------------------------------------------- bad input

def test_missing_metadata(user_folder):
    (user_folder / "metadata.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"no metadata file in .*metadata.jsonl"):
        load_captioned(user_folder)


def test_metadata_without_file_name_column(user_folder):
    (user_folder / "metadata.csv").write_text("filename,caption\na.png,x\n")
    with pytest.raises(ValueError, match=r"metadata.csv has no 'file_name' column .*rename"):
        load_captioned(user_folder)


def test_missing_caption_column(user_folder):
    expected = r"no column 'text' \(columns: \['image', 'caption'\]\).*caption_column"
    with pytest.raises(ValueError, match=expected):
        load_captioned(user_folder)


def test_truncated_image_named_and_skippable(user_folder):
    data = (user_folder / "b.png").read_bytes()
    (user_folder / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"b\.png \(row 1\): unreadable or truncated image.*skip_bad=True"):
        load_captioned(user_folder, LoadConfig(caption_column="caption"))
    ds = load_captioned(user_folder, LoadConfig(caption_column="caption", skip_bad=True))
    assert len(ds) == 2 and len(ds.skipped) == 1 and "b.png" in ds.skipped[0]
    assert [ds[i]["caption"] for i in range(2)] == ["a red thing on the left", "a yellow photo"]


def test_not_an_image_and_missing_file(user_folder):
    (user_folder / "c.jpg").write_text("not a jpeg")
    (user_folder / "a.png").unlink()
    with pytest.raises(ValueError, match=r"a\.png \(row 0\): unreadable"):
        load_captioned(user_folder, LoadConfig(caption_column="caption"))
    ds = load_captioned(user_folder, LoadConfig(caption_column="caption", skip_bad=True))
    assert len(ds) == 1 and len(ds.skipped) == 2


def test_empty_captions(user_folder):
    (user_folder / "metadata.csv").write_text('file_name,text\na.png,a red thing\nb.png,"  "\nc.jpg,\n')
    with pytest.raises(ValueError, match=r"b\.png \(row 1\): empty caption in column 'text'"):
        load_captioned(user_folder)
    ds = load_captioned(user_folder, LoadConfig(skip_bad=True))
    assert len(ds) == 1 and len(ds.skipped) == 2


def test_empty_caption_lists_and_mixed_types(user_folder):
    (user_folder / "metadata.csv").unlink()
    meta = user_folder / "metadata.jsonl"
    meta.write_text('{"file_name": "a.png", "text": ["a red thing", "red"]}\n'
                    '{"file_name": "b.png", "text": []}\n{"file_name": "c.jpg", "text": ["ok", ""]}\n')
    with pytest.raises(ValueError, match=r"b\.png \(row 1\): empty caption list"):
        load_captioned(user_folder)
    assert len(load_captioned(user_folder, LoadConfig(skip_bad=True))) == 1
    # a string in one row and a list in another is fine: one caption is picked per sample either way
    meta.write_text('{"file_name": "a.png", "text": "a red thing"}\n{"file_name": "b.png", "text": ["x"]}\n')
    assert [load_captioned(user_folder)[i]["caption"] for i in range(2)] == ["a red thing", "x"]
    meta.write_text('{"file_name": "a.png", "text": "a red thing"}\n{"file_name": "b.png", "text": oops}\n')
    with pytest.raises(ValueError, match=r"could not read the folder .*one JSON object per line"):
        load_captioned(user_folder)


def test_hub_id_offline_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"could not load hub dataset 'someone/no-such-set'.*local folder"):
        load_captioned("someone/no-such-set")


def test_bad_source_and_split(tmp_path, shapes_folder):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_captioned(str(tmp_path / "nope"))
    splits = r"\['train', 'validation', 'test', 'heldout'\]"
    with pytest.raises(ValueError, match=rf"split 'dev' not found.*{splits}"):
        load_captioned(shapes_folder, LoadConfig(split="dev"))
    with pytest.raises(ValueError, match="crop="):
        LoadConfig(crop="left")
