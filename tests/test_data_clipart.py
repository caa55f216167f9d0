"""Clip-art builder (data.clipart) on a tiny hand-written package tree: captions, drops by reason, determinism.

No apt and no network: the fake tree has the real package's layout (usr/share/openclipart/svg/<category>/...,
usr/share/doc/openclipart-svg/copyright) and SVGs with the same RDF metadata as openclipart's.
"""

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from data import clipart
from data.debian import square_on_white

NS = ('xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
      'xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"')
DISC = '<circle cx="50" cy="50" r="40" fill="{}"/>'
RED_DISC = DISC.format("#dd2222")


def svg(title, keywords=(), description="", creator="Someone Else", body=RED_DISC):
    bag = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return (f'<?xml version="1.0"?>\n<svg {NS} width="100" height="100" viewBox="0 0 100 100"><metadata><rdf:RDF>'
            f'<cc:Work rdf:about=""><dc:title>{title}</dc:title><dc:description>{description}</dc:description>'
            f'<dc:subject><rdf:Bag>{bag}</rdf:Bag></dc:subject><dc:creator><cc:Agent><dc:title>{creator}'
            f'</dc:title></cc:Agent></dc:creator></cc:Work></rdf:RDF></metadata>{body}</svg>')


GOOD = {  # path -> (svg, expected captions)
    "food/fruit/apple_01.svg": (svg("An Apple", ["food", "apple", "fruit"]),
                                ["a red apple", "an apple", "a fruit"]),
    "animals/mammals/dogs/bored_dog_01.svg": (
        svg("Bored dog", ["mammal", "dog", "animal"], body=DISC.format("#8b4513")),
        ["a bored brown dog", "a bored dog", "a dog"]),
    "animals/birds/cigno_architetto_01.svg": (  # Italian title, translated; the keyword gives the class
        svg("Cigno di notte nella palude", ["bird"], body=DISC.format("#2255dd")),
        ["a blue swan", "a swan", "a bird"]),
    "food/fruit/prune.svg": (  # a template title copied from another file: only the keywords are trusted
        svg("Clipart by Nicu Buculei - pear", ["food", "fruit"], creator="Nicu Buculei",
            body=DISC.format("#8833bb")),
        ["a purple fruit", "a fruit"]),
    "food/beverages/soft_drink.svg": (  # a line drawing: mostly outline, so no colour word
        svg("Soft Drink in a Cup (B and W)", ["food", "menu", "beverage"],
            body='<rect x="20" y="10" width="60" height="80" fill="white" stroke="black" stroke-width="3"/>'),
        ["a soft drink in a cup", "a drink"]),
}
NOISE = {  # path -> (svg or raw text, reason)
    "computer/icons/etiquette-theme/seal.svg": (svg("Etiquette Icons", ["mammal", "animal"]), clipart.ICON_THEME),
    "shapes/stars/gramastar_0042.svg": (svg("gramastar", ["star"]), clipart.GRAMASTAR),
    "signs_and_symbols/flags/europe/france.svg": (svg("France", ["europe", "flag"]), clipart.FLAG),
    "special/patterns/pattern-dots.svg": (svg("dots square grid 05 pattern", ["pattern"]), clipart.SWATCH),
    "animals/bugs/ant.svg": (  # a white page with a speck on it (a transparent margin would be cropped away)
        svg("Ant", ["insect"], body='<rect width="100" height="100" fill="white"/><circle cx="50" cy="50" r="2"/>'),
        clipart.NEAR_EMPTY),
    "office/broken.svg": ("<svg><metadata><dc:title>Oops</metadata>", clipart.UNPARSABLE),
    "people/jane_doe_01.svg": (svg("Jane Doe", ["people"], creator="Jane Doe"), clipart.AUTHOR),
    "unsorted/Pinguino1.svg": (svg("Various Cliparts"), clipart.NO_NOUN),
    "unsorted/duplicates/apple_01.svg": (GOOD["food/fruit/apple_01.svg"][0], clipart.DUPLICATE),
}
COPYRIGHT = "Copyright:\n\n creative commons Public Domain Dedication\n"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("openclipart-svg")
    for rel, (text, _) in {**GOOD, **NOISE}.items():
        path = root / clipart.SVG_DIR / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    doc = root / clipart.DOC_DIR
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(COPYRIGHT)
    (doc / "changelog.Debian.gz").write_bytes(gzip.compress(b"openclipart (1:0.18+dfsg-19) unstable; urgency=medium\n"))
    return root


@pytest.fixture(scope="module")
def built(package, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "set"
    report = clipart.build(package, out, clipart.BuildConfig(size=32, workers=1), command="test", progress=False)
    return out, report


def _rows(out):
    return [json.loads(line) for split in clipart.SPLITS
            for line in (out / split / "metadata.jsonl").read_text().splitlines()]


def test_good_files_get_the_expected_captions(built):
    out, report = built
    rows = {row["source"]: row for row in _rows(out)}
    assert set(rows) == set(GOOD)
    for source, (_, captions) in GOOD.items():
        assert rows[source]["captions"] == captions, source
        assert rows[source]["text"] == captions[0]
        assert rows[source]["category"] == source.split("/")[0]
    assert rows["food/fruit/apple_01.svg"]["keywords"] == ["food", "apple", "fruit"]
    assert report["kept"] == len(GOOD) and report["files"] == len(GOOD) + len(NOISE)


def test_each_noise_file_is_dropped_and_counted_by_its_reason(built):
    _, report = built
    expected = {}
    for _, reason in NOISE.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert report["dropped"] == expected


def test_images_are_white_squares_of_the_asked_size(built):
    out, _ = built
    for split in clipart.SPLITS:
        for row in map(json.loads, (out / split / "metadata.jsonl").read_text().splitlines()):
            with Image.open(out / split / row["file_name"]) as im:
                assert im.size == (32, 32) and im.mode == "RGB"
                assert im.getpixel((0, 0)) == (255, 255, 255) or row["source"].endswith("soft_drink.svg")


def test_card_licence_and_report_are_written(built):
    out, report = built
    card = (out / "README.md").read_text()
    assert "openclipart-svg" in card and "1:0.18+dfsg-19" in card and "Public Domain Dedication" in card
    assert "a bored brown dog" in card and clipart.GRAMASTAR in card
    assert (out / "LICENSE").read_text() == COPYRIGHT
    assert json.loads((out / "report.json").read_text())["dropped"] == report["dropped"]
    assert sum(report["splits"].values()) == report["kept"]


def test_build_is_deterministic_whatever_the_worker_count(package, built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    clipart.build(package, again, clipart.BuildConfig(size=32, workers=2), progress=False)
    for split in clipart.SPLITS:
        assert (again / split / "metadata.jsonl").read_bytes() == (out / split / "metadata.jsonl").read_bytes()
        for png in (out / split).glob("*.png"):
            assert (again / split / png.name).read_bytes() == png.read_bytes()


def test_split_is_a_stable_hash_of_the_path_with_about_five_percent_heldout(built):
    out, _ = built
    for split in clipart.SPLITS:
        for row in map(json.loads, (out / split / "metadata.jsonl").read_text().splitlines()):
            assert clipart.split_of(row["source"]) == split
    sources = [f"animals/x_{i}.svg" for i in range(4000)]
    share = sum(clipart.split_of(s) == "heldout" for s in sources) / len(sources)
    assert 0.035 < share < 0.065
    assert [clipart.split_of(s) for s in sources] == [clipart.split_of(s) for s in sources]


def test_the_project_loader_reads_the_set(built):
    from data.loading import LoadConfig, load_captioned
    out, report = built
    ds = load_captioned(out, LoadConfig(resolution=32, caption_column="captions"))
    assert len(ds) == report["splits"]["train"]
    item = ds[0]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["caption"] in {c for _, caps in GOOD.values() for c in caps}


def test_a_folder_that_is_not_an_earlier_build_is_left_alone(package, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        clipart.build(package, tmp_path, clipart.BuildConfig(size=32, workers=1), progress=False)
    with pytest.raises(FileNotFoundError, match="package root"):
        clipart.build(tmp_path, tmp_path / "out", clipart.BuildConfig(size=32, workers=1), progress=False)


@pytest.mark.parametrize("title, expected", [
    ("Egg on Muffin", "an egg on a muffin"),
    ("Cani e gatti , Cat and dog", "a cat and a dog"),
    ("Sleeping bear under stars with snow", "a sleeping bear"),
    ("Table tennis racquets", "table tennis racquets"),
    ("Three Apples", "three apples"),
    ("Hot Dog (B and W)", "a hot dog"),
    ("an umbrella", "an umbrella"),
    ("Leone 01", "a lion"),
    ("Scissors", "scissors"),
    ("Milk", "milk"),
    ("Earth and North Star", "the earth"),
    ("greenArrow_01", "a green arrow"),
    ("Copper the Beagle", "a beagle"),
    ("Grass Hopper", "a grasshopper"),
    ("Biohazard symbol", "a biohazard symbol"),  # "biohazard" alone is already "biohazard symbol"
    ("Blue Gun", "a blue gun"),
    ("Baseball", "a baseball"),
    ("Autos", "cars"),
    ("Antilope", "an antelope"),
    ("nodding donkey", "an oil pump"),
    ("pantyhose11", "pantyhose"),
    ("Crossbones", "a skull and crossbones"),
    ("Martin Luther King Jr. memorial", None),
])
def test_titles_become_plain_noun_phrases(title, expected):
    phrase = clipart.noun_phrase(clipart.tokens(title))
    assert (phrase and clipart.with_article(" ".join(phrase))) == expected


@pytest.mark.parametrize("title", ["Various Cliparts", "Macchina", "Debian Nuskool", "R16 sibmission"])
def test_titles_without_an_english_noun_give_no_phrase(title):
    assert clipart.noun_phrase(clipart.tokens(title)) is None


def test_a_keyword_gives_its_head_noun_and_a_folder_word_only_files_the_picture():
    clip = clipart.Clip(source="unsorted/x.svg", category="unsorted", title="x", description="",
                        keywords=("map_symbol", "people", "grass hopper", "food"), creator="")
    # "map_symbol" is a symbol (not a map); "people" and "food" name top folders
    assert clipart._keyword_nouns(clip) == (["grasshopper"], ["symbol", "person"])


def test_a_series_titled_people_shows_one_person_each_and_mass_nouns_get_no_colour():
    clip = clipart.Clip(source="computer/icons/people_01a.svg", category="computer", title="people",
                        description="", keywords=("icon", "people"), creator="Juliane Krug")
    assert clipart.captions_for(clipart.subject_of(clip), "green") == ["a person"]
    assert clipart.with_colour(["milk"], "black") is None  # the carton's colour, not the milk's
    assert clipart.with_colour(["dog"], "brown") == ["brown", "dog"]


@pytest.mark.parametrize("source, title, keywords, expected", [
    ("people/smilies/smiley111.svg", "smiley", ("people", "smiley"), ["a smiley"]),  # not "a person"
    ("people/beach_trip.svg", "Beach trip", ("people", "beach"), ["a beach"]),
    ("people/a_happy_boy_01.svg", "A happy boy", ("people", "boy"), ["a happy boy", "a boy", "a person"]),
    # the name's pieces come back as keywords ("king"): they are not what the picture shows
    ("people/mlk.svg", "Martin Luther King Jr.", ("martin", "king", "luther", "people"), ["a person"]),
])
def test_the_person_class_is_only_for_people(source, title, keywords, expected):
    clip = clipart.Clip(source=source, category="people", title=title, description="", keywords=keywords,
                        creator="")
    assert clipart.captions_for(clipart.subject_of(clip), None) == expected


def _item(source, text, category="food", digest=None):
    return clipart.Item(source, row={"text": text, "category": category}, digest=digest or source)


def test_limits_drop_identical_images_then_cap_captions_and_categories():
    items = [_item(f"food/card_{i}.svg", "a card") for i in range(5)]
    items += [_item(f"food/apple_{i}.svg", f"apple {i}") for i in range(5)]
    items += [_item("animals/dog.svg", "a dog", "animals"),
              _item("animals/dog2.svg", "a dog", "animals", digest="animals/dog.svg")]  # same pixels as dog.svg
    kept, dropped = clipart.apply_limits(items, category_cap=4, category_caps={}, caption_cap=2)
    assert dropped == {clipart.DUPLICATE: 1, clipart.OVER_CAPTION_CAP: 3, clipart.OVER_CATEGORY_CAP: 3}
    assert sum(it.row["text"] == "a card" for it in kept) == 2
    assert sum(it.row["category"] == "food" for it in kept) == 4
    assert [it.source for it in kept] == sorted(it.source for it in kept)
    assert [it.source for it in kept] == [it.source for it in clipart.apply_limits(items, 4, {}, 2)[0]]


def test_square_on_white_flattens_alpha_onto_white_and_pads_without_cropping_the_object():
    image = Image.new("RGBA", (60, 30), (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), (10, 5, 50, 25))   # opaque red, 40 x 20, inside transparent margins
    image.paste((0, 0, 0, 128), (10, 5, 20, 25))     # its left quarter half-transparent black
    square = np.asarray(square_on_white(image, 40)).astype(int)
    assert square.shape == (40, 40, 3)
    # margins cropped, the 40 x 20 object padded to 40 x 40: white bands above and below, none of it cut
    assert (square[:9] == 255).all() and (square[31:] == 255).all()
    assert (square[12:28, 12:38] == (200, 0, 0)).all()
    assert np.abs(square[12:28, 1:8] - 127).max() <= 2  # black at half alpha over white: mid gray
