"""A real captioned clip-art set from Debian's `openclipart-svg`: public-domain drawings, captions from their metadata.

Nobody here drew these pictures or wrote their titles, which is the point: it is the project's real data
(DESIGN.md, "A person's own data is the real test"). The package (0.18: 8,121 SVGs in category folders)
is fetched with apt through `data.debian.package_files`; each SVG's RDF metadata (`dc:title`,
`dc:description`, `dc:subject` keywords) and its folder give the caption, and the rendered picture gives a
colour word when one colour clearly dominates:

    animals/mammals/dogs/bored_dog_01.svg  "Bored dog" [mammal, dog, animal]  ->  "a bored brown dog"

Much of the package is not a captioned picture of a thing, and every file left out is counted by reason
(PITFALLS.md, "Debian openclipart-svg"): icon-theme titles, author names as titles, 1,375 generated
"gramastar" stars, flags, pattern and gradient swatches, titles with no English noun, near-empty or failed
renders, identical images. No category and no caption may dominate (caps). Captions never come from
file names, which are often only an author's name.

Run:  nice -n 10 python -m data.clipart --out cache/clipart64           (fetches the package with apt)
      python -m data.clipart --source DIR --out cache/clip              (DIR: an unpacked package tree)

Layout (Hugging Face imagefolder, loadable with data.loading.load_captioned):

    <out>/README.md, LICENSE (the package's copyright file), report.json (counts, drops, time)
    <out>/{train,heldout}/00000.png ..., metadata.jsonl:
        file_name, text, captions (1-3 true phrasings), category (top folder), keywords, title, source

The split is a hash of the file's path in the package (5% heldout), so it does not move when filters change.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data import clipart_words as W
from data.debian import package_files, render_svg, square_on_white

PACKAGE = "openclipart-svg"
SVG_DIR = Path("usr/share/openclipart/svg")
DOC_DIR = Path("usr/share/doc/openclipart-svg")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5
RENDER_SCALE = 4        # draw at 4x the output side, then downsample: thin lines stay visible
NEAR_EMPTY_INK = 0.02   # below this share of non-white pixels the picture is a speck or a blank
CATEGORY_CAP = 300      # at most this many pictures per top folder (~15% of the set) ...
CATEGORY_CAPS = {"computer": 60}  # ... and far fewer of the 2,158 computer icons
CAPTION_CAP = 12        # at most this many pictures share one `text` (226 playing cards are all "a card")

DC = "{http://purl.org/dc/elements/1.1/}"
RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"

# Drop reasons, as counted in report.json and the dataset card.
UNPARSABLE = "unparsable SVG (XML error)"
ICON_THEME = "icon-theme title"
AUTHOR = "author-name title"
GRAMASTAR = "generated star (gramastar)"
FLAG = "flag"
SWATCH = "pattern or gradient swatch"
NO_NOUN = "no usable English noun"
RENDER_FAILED = "render failed"
NEAR_EMPTY = "near-empty render"
DUPLICATE = "identical image (same pixels)"
OVER_CATEGORY_CAP = "over the category cap"
OVER_CAPTION_CAP = "over the per-caption cap"

# The package's top folders as words: as a keyword they file a picture rather than describe it.
CATEGORY_WORDS = frozenset("animal building button computer container decoration education electronic food "
                           "geography logo office people plant recreation science shape sign symbol special tool "
                           "transportation".split())
# Titles naming an icon theme rather than the picture ("Etiquette Icons", "Lemon SVG theme", ...).
_ICON_THEME = re.compile(r"\bicons?\b|\btheme\b|iconset|flat icon collection", re.I)
# Titles naming the collection the file came in; the keywords and folder may still say what it shows.
_COLLECTION = re.compile(r"various cliparts|svg road signs|aiga_symbol_signs|australian maps|gradient collection"
                         r"|homes clipart|map symbols|boating rules illustration", re.I)
# Collection titles that do say what every picture in them is.
COLLECTION_NOUNS = {"svg road signs": "road sign", "road signs": "road sign", "australian maps": "map",
                    "homes clipart": "house", "people": "person"}  # "people": a series of one-person icons
# "Clipart by Nicu Buculei - pear": a template title, copied unchanged onto apples, lemons and plums.
_TEMPLATE = re.compile(r"^\s*clip\s*art by [^-]+-\s*", re.I)
_NOISE = re.compile(r"hand[- ]drawn|body[- ]part|martin luther king|\S+@\S+|https?://\S+|www\.\S+|hash\(0x[0-9a-f]+\)|0x[0-9a-f]+|\([^)]*\bemail\b[^)]*\)"
                    r"|\(b and w\)|\bb&w\b", re.I)


# ----------------------------------------------------------------------------- metadata

@dataclass(frozen=True)
class Clip:
    """One SVG's metadata: path in the package's svg folder, top folder, and the RDF fields."""

    source: str
    category: str
    title: str
    description: str
    keywords: tuple[str, ...]
    creator: str


def _text(element: ET.Element | None) -> str:
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


def read_clip(path: Path, svg_root: Path) -> Clip:
    """Parse one SVG's RDF metadata. Raises ET.ParseError for broken XML.

    ElementTree neither fetches external entities nor runs anything; the work's own title is the
    `dc:title` directly under `cc:Work` (an agent's `dc:title` is a person's name).
    """
    root = ET.parse(path).getroot()
    work = next((e for e in root.iter() if e.tag.endswith("}Work")), None)
    title = description = creator = ""
    keywords: list[str] = []
    if work is not None:
        title = _text(work.find(f"{DC}title"))
        description = _text(work.find(f"{DC}description"))
        keywords = [_text(li) for li in work.iterfind(f"{DC}subject/{RDF}Bag/{RDF}li")]
        creator = _text(work.find(f"{DC}creator"))
    rel = path.relative_to(svg_root).as_posix()
    return Clip(source=rel, category=rel.split("/")[0] if "/" in rel else "unsorted", title=title,
                description=description, keywords=tuple(k for k in keywords if k), creator=creator)


# ----------------------------------------------------------------------------- words -> noun phrases

def _singular(word: str) -> str:
    if word in W.IRREGULAR_PLURALS:
        return W.IRREGULAR_PLURALS[word]
    stem = None
    if word.endswith("ies"):
        stem = word[:-3] + "y"
    elif word.endswith("ves"):
        stem = word[:-3] + "f"
    elif re.search(r"(s|x|z|ch|sh|o)es$", word):
        stem = word[:-2]
    elif word.endswith("s") and not word.endswith("ss"):
        stem = word[:-1]
    return stem if stem in W.NOUNS | W.BROAD_NOUNS else word


def _kind(word: str) -> str | None:
    """'noun' (a specific thing), 'broad' (a class of things), 'mod' (a noun used only before another:
    "soccer"), 'adj', 'conn', or None (not trusted)."""
    if word in W.PHRASES.values() or _singular(word) in W.NOUNS:
        return "noun"
    if _singular(word) in W.BROAD_NOUNS:
        return "broad"
    if word in W.MODIFIERS:
        return "mod"
    if word in W.ADJECTIVES or word in W.COLOUR_WORDS or word in W.NUMBER_WORDS:
        return "adj"
    if word in W.CONNECTORS:
        return "conn"
    return None


def tokens(text: str, drop: frozenset[str] = frozenset()) -> list[str]:
    """Lowercase words of a title: camel case and underscores split, numbers, file-ish and meta words and the
    words in `drop` (the author's name) removed, foreign words translated, known compounds merged."""
    text = _NOISE.sub(" ", text)
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text).replace("_", " ").replace("-", " ").lower()
    words = [w for w in re.findall(r"[a-z]+(?:'[a-z]+)?", text) if len(w) > 1 or w == "a"]
    words = [w for w in words if w not in W.META_WORDS and w not in drop]
    # compounds before and after translating: "pallone aerestatico" is one thing, "pallone" alone a ball
    words = " ".join(W.BROAD_ALIASES.get(w, W.TRANSLATIONS.get(w, w)) for w in _merge(words)).split()
    merged = _merge(words)
    # "gatto cat" -> "cat cat" -> "cat"; "biohazard symbol" -> "biohazard symbol symbol" -> "biohazard symbol"
    return [w for j, w in enumerate(merged) if j == 0 or not (w == merged[j - 1] or merged[j - 1].endswith(" " + w))]


def _merge(words: list[str]) -> list[str]:
    """Known compounds as one token, longest first: "hot air balloon" before "balloon"."""
    merged: list[str] = []
    i = 0
    while i < len(words):
        for n in (3, 2, 1):
            chunk = " ".join(words[i:i + n])
            if len(words[i:i + n]) == n and chunk in W.PHRASES:
                merged.append(W.PHRASES[chunk])
                i += n
                break
        else:
            merged.append(words[i])
            i += 1
    return merged


def noun_phrase(words: list[str], max_words: int = 6) -> list[str] | None:
    """The longest run of trusted words that ends in a noun ("soft drink in a cup", "bored dog"), or None.

    A run breaks at any word not in the lists (place names, foreign words, "the"): what is left is only
    words a person would use for the picture. Specific nouns beat broad ones ("beagle" over "animal").
    """
    best: tuple[tuple, list[str]] | None = None
    run: list[str] = []
    for position, word in enumerate([*words, "<end>"]):
        kind = _kind(word) if word != "<end>" else None
        if kind == "conn" and word in ("a", "an") and (not run or run[-1] not in ("of", "with", "in", "on")):
            kind = None  # an article only inside a phrase: "in a cup"
        if kind is not None:
            run.append(word)
            continue
        start = position - len(run)
        for offset in range(len(run)):  # every suffix, so a long run still yields its last words
            phrase = _trim(run[offset:])
            if phrase and len(phrase) <= max_words and _well_formed(phrase):
                # a specific noun first, then the title's first phrase ("sleeping bear under stars"), then longest
                key = (any(_kind(w) == "noun" for w in phrase), -(start + offset), len(phrase))
                if best is None or key > best[0]:
                    best = (key, phrase)
        run = []
    return best[1] if best else None


def _trim(run: list[str]) -> list[str]:
    """A run cut to end in a noun and start with a content word."""
    while run and _kind(run[-1]) not in ("noun", "broad"):
        run = run[:-1]
    while run and _kind(run[0]) == "conn":
        run = run[1:]
    return run


def _well_formed(phrase: list[str]) -> bool:
    """At most two nouns side by side ("apple pie"), and the first of two singular ("dogs cats" is a list)."""
    nouns = [_kind(w) in ("noun", "broad") for w in phrase]
    for i in range(len(phrase) - 1):
        if nouns[i] and nouns[i + 1] and (_singular(phrase[i]) != phrase[i] or (i + 2 < len(phrase) and nouns[i + 2])):
            return False
    return True


def _head(phrase: list[str]) -> str:
    """The noun that decides the article and number: the last noun before the first connector."""
    head = phrase[-1]
    for word in phrase:
        if _kind(word) == "conn":
            break
        if _kind(word) in ("noun", "broad"):
            head = word
    return head


# ----------------------------------------------------------------------------- what a file shows

@dataclass(frozen=True)
class Subject:
    """What the caption says a file shows: the main phrase and, when known, the broad class it belongs to."""

    phrase: tuple[str, ...]
    broad: str | None


def noise_reason(clip: Clip) -> str | None:
    """Why this file is not a captioned picture of a thing, from its metadata alone; None if it may be."""
    title = clip.title.strip()
    if title.lower() == "gramastar":
        return GRAMASTAR
    path = clip.source.lower()
    if "/flags/" in f"/{path}" or "flag" in tokens(title) or any("flag" in k.lower() for k in clip.keywords):
        return FLAG
    if path.startswith("special/") and ("pattern" in path or "gradient" in path):
        return SWATCH
    if _ICON_THEME.search(_TEMPLATE.sub("", title)) and not _COLLECTION.search(title):
        return ICON_THEME
    return None


def _author_words(clip: Clip) -> frozenset[str]:
    return frozenset(tokens(clip.creator)) - W.NOUNS - W.BROAD_NOUNS


def _is_author_title(clip: Clip) -> bool:
    """A title that is only the author's name (or an e-mail address): "Architetto Francesco Rollandin"."""
    if "@" in clip.title and not tokens(_NOISE.sub(" ", clip.title)):
        return True
    words = set(tokens(clip.title)) - {"a", "by"}
    return bool(words) and words <= set(tokens(clip.creator))


def _keyword_nouns(clip: Clip) -> tuple[list[str], list[str]]:
    """Specific and broad nouns among the keywords, singular, in their order: each keyword's head noun
    ("map_symbol" is a symbol, not a map). A keyword naming a top folder ("computer", "button") files the
    picture, so it is only broad."""
    specific: list[str] = []
    broad: list[str] = []
    # words the title's noise removed ("Martin Luther King Jr."): as keywords they are the name's pieces too
    removed = {w for m in _NOISE.finditer(clip.title) for w in m.group(0).lower().split()}
    for keyword in clip.keywords:
        if keyword.lower() in removed:
            continue
        phrase = noun_phrase(tokens(keyword))
        if phrase:
            word = _singular(_head(phrase))
            kind = _kind(word)
            target = broad if kind == "broad" or (kind == "noun" and word in CATEGORY_WORDS) else (
                specific if kind == "noun" else None)
            if target is not None and word not in target:
                target.append(word)
    return specific, [w for w in broad if _kind(w) == "broad"]


def _folder_noun(clip: Clip) -> str | None:
    """The innermost folder when it is one noun: "animals/birds/x.svg" -> "bird"; "map_symbols" -> None."""
    parts = clip.source.split("/")[:-1]
    if not parts or not re.fullmatch(r"[a-z]+", parts[-1]):
        return None
    word = _singular(W.TRANSLATIONS.get(parts[-1], parts[-1]))
    word = W.PHRASES.get(word, word)
    return word if _kind(word) in ("noun", "broad") else None


def _specific(phrase: list[str] | None) -> bool:
    """A phrase with a specific noun; a top folder's name ("building") is a broad one."""
    return bool(phrase) and any(_kind(w) == "noun" and not (len(phrase) == 1 and w in CATEGORY_WORDS)
                                for w in phrase)


def _description_phrase(clip: Clip) -> list[str] | None:
    """A description is used only when it is short and plain ("White magnolia"), not a sentence or credit."""
    text = clip.description
    if not text or len(text.split()) > 6 or re.search(r"[@/:.!?]|\d", text):
        return None
    return noun_phrase(tokens(text, _author_words(clip)))


def subject_of(clip: Clip) -> Subject | None:
    """What the picture shows, from the best source that names something; None when nothing does.

    Order: the title (not an author's name, collection name or unconfirmed template), a short plain
    description, a specific keyword, the folder, then a broad title/keyword/folder noun ("a bird").
    A template title is used only when a keyword or the folder confirms its noun, and then without its
    adjectives (Nicu Buculei's "jigsaw_red_10" is on blue pieces too).
    """
    specific_kw, broad_kw = _keyword_nouns(clip)
    folder = _folder_noun(clip)
    template = bool(_TEMPLATE.match(clip.title))
    title_phrase = None
    if clip.title.lower() in COLLECTION_NOUNS:
        title_phrase = [COLLECTION_NOUNS[clip.title.lower()]]
    elif not _is_author_title(clip) and not _COLLECTION.search(clip.title):
        title_phrase = noun_phrase(tokens(_TEMPLATE.sub("", clip.title), _author_words(clip)))
    if template and title_phrase is not None:
        confirmed = {_singular(w) for w in [*specific_kw, *broad_kw, folder or ""]}
        head = _singular(_head(title_phrase))
        title_phrase = [head] if head in confirmed else None
    description = _description_phrase(clip)
    # The title's own words first, even when broad ("Dream Flower" is "a flower", though a keyword says
    # "rainbow"); keyword nouns are often things near the subject or in its story.
    titled = [c for c in (title_phrase, description) if _specific(c)] + [c for c in (title_phrase,) if c]
    specific = titled + [c for c in [*([w] for w in specific_kw), [folder] if folder else None] if _specific(c)]
    broad = [c for c in [description, [folder] if folder else None, *([w] for w in broad_kw)]
             if c and (_kind(c[-1]) == "broad" and c != [c[-1]] or c[0] in W.BROAD_ALONE)]
    if not any(_specific(c) for c in specific) and _is_author_title(clip):
        return None  # "an animal" from the keywords is too little to keep a file whose title is a name
    chosen = specific[0] if specific else broad[0] if broad else None
    if chosen is None:
        return None
    head = _singular(_head(chosen))
    # The class comes from the keywords or the folder, which file the picture ("mammal", "birds"), never from
    # other keyword nouns, which are often things near it in the picture or in its story.
    classes = [w for w in [*broad_kw, folder] if w in W.BROAD_ALONE and w != head
               # a smiley, hat or beach filed under people/ is not a person
               and (w != "person" or head in W.PEOPLE_NOUNS or head == "silhouette")]
    return Subject(phrase=tuple(chosen), broad=classes[0] if classes else None)


# ----------------------------------------------------------------------------- captions

def with_article(phrase: str) -> str:
    """'a'/'an' before a singular countable noun, at the start and after "of/with/on/in" ("an egg on a muffin");
    none before plurals, numbers and mass nouns; "the" before THE_NOUNS ("the earth")."""
    words = phrase.split()
    out: list[str] = []
    for i, word in enumerate(words):
        starts_group = i == 0 or words[i - 1] in ("of", "with", "on", "in", "and")
        if starts_group and word not in W.CONNECTORS:
            out.append(_article(words[i:]))
        out.append(word)
    return " ".join(a for a in out if a)


def _article(words: list[str]) -> str:
    """The article for a noun group: '', 'a', 'an' or 'the'."""
    nouns = [i for i, w in enumerate(words) if _kind(w) in ("noun", "broad")]  # "green and yellow fireworks"
    end = next((i for i, w in enumerate(words) if w in W.CONNECTORS and nouns and i > nouns[0]), len(words))
    group = words[:end]
    head = _head(group) if any(_kind(w) in ("noun", "broad") for w in group) else group[-1]
    if head in W.THE_NOUNS:
        return "the"
    if (group[0] in W.NUMBER_WORDS or head in W.MASS_NOUNS or head in W.ALWAYS_PLURAL
            or (_singular(head) != head and head not in W.PHRASES.values())):
        return ""
    first = group[0]
    vowel = first[0] in "aeiou" and not re.match(r"u(ni|s[aeu])|eu|one", first) or re.match(r"hour|honest", first)
    return "an" if vowel else "a"


def with_colour(phrase: list[str], colour: str) -> list[str] | None:
    """The colour before the first noun or modifier, after opinion and size words ("a bored brown dog",
    "a red soccer ball", "a brown wooden chair"). None when the phrase already names a colour or joins
    several things ("a cup of coffee" has no single colour). People get no colour word, which would read
    as skin colour: a black filled person is "a silhouette of a woman", any other colour is left out.
    A mass noun gets none either: milk, coffee and bread are drawn in a carton, cup or bag, whose colour
    is the one measured ("black milk")."""
    if any(w in W.COLOUR_WORDS or w in W.THE_NOUNS or _kind(w) == "conn" for w in phrase):
        return None
    if _head(phrase) in W.MASS_NOUNS:
        return None
    if _singular(_head(phrase)) in W.PEOPLE_NOUNS:
        return ["silhouette", "of", *phrase] if colour == "black" else None
    at = next(i for i, w in enumerate(phrase) if _kind(w) in ("noun", "broad", "mod"))
    return [*phrase[:at], colour, *phrase[at:]]


def captions_for(subject: Subject, colour: str | None) -> list[str]:
    """1-3 true phrasings, the most informative first: with the colour, without it, the head noun alone
    ("a bored brown dog", "a bored dog", "a dog"), the broad class ("an animal")."""
    plain = list(subject.phrase)
    coloured = with_colour(plain, colour) if colour else None
    head = _head(plain)
    alone = _kind(head) == "noun" and not any(_kind(w) == "conn" for w in plain)  # "a cup", not of "a cup of tea"
    options = [coloured, plain, [head] if alone else None,
               [subject.broad] if subject.broad else None]
    captions: list[str] = []
    for option in options:
        if option:
            caption = with_article(" ".join(option))
            if caption not in captions:
                captions.append(caption)
    return captions[:3]


# ----------------------------------------------------------------------------- pixels

# Hue bins in degrees for the colour word (HSV hue of PIL, 0-255, scaled to 0-360).
_HUES = (("red", 0, 12), ("orange", 12, 40), ("yellow", 40, 68), ("green", 68, 165), ("blue", 165, 255),
         ("purple", 255, 300), ("pink", 300, 340), ("red", 340, 361))


def ink_share(image: Image.Image) -> float:
    """Share of pixels that are not (near) white."""
    rgb = np.asarray(image.convert("RGB"))
    return float((rgb.min(axis=-1) < 230).mean())


def dominant_colour(image: Image.Image) -> str | None:
    """The colour word of the drawn pixels when one colour clearly dominates, else None.

    Black counts only for filled silhouettes (a quarter to 60% of the square), so line drawings, which are
    mostly black outline around white fill, and pictures on a dark background get no colour. Gray and
    white never name a picture's colour.
    """
    hsv = np.asarray(image.convert("HSV")).reshape(-1, 3).astype(np.float32)
    ink = np.asarray(image.convert("RGB")).reshape(-1, 3).min(axis=-1) < 230
    if ink.sum() == 0:
        return None
    hue, sat, val = hsv[ink, 0] * 360 / 255, hsv[ink, 1] / 255, hsv[ink, 2] / 255
    names = np.full(hue.shape, "gray", dtype=object)
    chroma = (sat >= 0.25) & (val >= 0.25)
    for name, lo, hi in _HUES:
        names[chroma & (hue >= lo) & (hue < hi)] = name
    names[chroma & (hue >= 10) & (hue < 50) & (val < 0.6)] = "brown"
    names[val < 0.25] = "black"
    name, count = Counter(names.tolist()).most_common(1)[0]
    share_of_ink, share_of_image = count / len(names), count / len(ink)
    if name == "black":
        return name if share_of_ink >= 0.7 and 0.25 <= share_of_image <= 0.6 else None  # more: a dark background
    if name == "gray":
        return None
    return name if share_of_ink >= 0.6 and share_of_image >= 0.08 else None


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)  # fixed parameters and no time chunk: same bytes each run
    return buf.getvalue()


# ----------------------------------------------------------------------------- one file

@dataclass
class Item:
    """What one file became: a reason it was dropped, or its row, PNG and pixel digest."""

    source: str
    reason: str | None = None
    row: dict | None = None
    png: bytes = b""
    digest: str = ""


def process(job: tuple[str, str, int]) -> Item:
    """Metadata, filters, render and captions for one SVG (runs in a worker process)."""
    svg_root, source, size = job
    path = Path(svg_root) / source
    try:
        clip = read_clip(path, Path(svg_root))
    except ET.ParseError:
        return Item(source, UNPARSABLE)
    reason = noise_reason(clip)
    if reason:
        return Item(source, reason)
    subject = subject_of(clip)
    if subject is None:
        return Item(source, AUTHOR if _is_author_title(clip) else NO_NOUN)
    try:
        image = square_on_white(render_svg(path, size * RENDER_SCALE), size)
    except Exception:  # cairosvg raises many types (entities, bad paths, bad numbers): all mean "cannot draw"
        return Item(source, RENDER_FAILED)
    if ink_share(image) < NEAR_EMPTY_INK:
        return Item(source, NEAR_EMPTY)
    captions = captions_for(subject, dominant_colour(image))
    row = {"text": captions[0], "captions": captions, "category": clip.category, "keywords": list(clip.keywords),
           "title": clip.title, "source": source}
    return Item(source, row=row, png=png_bytes(image), digest=hashlib.sha1(image.tobytes()).hexdigest())


# ----------------------------------------------------------------------------- the set

def split_of(source: str) -> str:
    """'heldout' for ~5% of files, by a hash of the path: stable across runs, machines and filter changes."""
    return "heldout" if int(hashlib.sha1(source.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT else "train"


def _rank(source: str) -> str:
    return hashlib.sha1(f"cap:{source}".encode()).hexdigest()  # a fixed shuffle, so caps keep a spread sample


def apply_limits(items: list[Item], category_cap: int = CATEGORY_CAP, category_caps: dict | None = None,
                 caption_cap: int = CAPTION_CAP) -> tuple[list[Item], Counter]:
    """Drop identical images (the first path wins), then keep at most `caption_cap` per caption and
    `category_cap` (or `category_caps[category]`) per top folder, chosen by a fixed hash order."""
    category_caps = CATEGORY_CAPS if category_caps is None else category_caps
    dropped: Counter = Counter()
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.digest in seen:
            dropped[DUPLICATE] += 1
            continue
        seen.add(item.digest)
        unique.append(item)
    kept, per_caption, per_category = [], Counter(), Counter()
    for item in sorted(unique, key=lambda it: _rank(it.source)):
        text, category = item.row["text"], item.row["category"]
        if per_caption[text] >= caption_cap:
            dropped[OVER_CAPTION_CAP] += 1
        elif per_category[category] >= category_caps.get(category, category_cap):
            dropped[OVER_CATEGORY_CAP] += 1
        else:
            per_caption[text] += 1
            per_category[category] += 1
            kept.append(item)
    return sorted(kept, key=lambda it: it.source), dropped


@dataclass(frozen=True)
class BuildConfig:
    """How to build the set; stored in report.json."""

    size: int = 64
    workers: int = 2
    category_cap: int = CATEGORY_CAP
    caption_cap: int = CAPTION_CAP


def process_all(svg_root: Path, size: int, workers: int, progress: bool = True) -> list[Item]:
    """Every SVG under `svg_root` through `process`, in path order, with a pool of `workers` processes."""
    sources = sorted(p.relative_to(svg_root).as_posix() for p in svg_root.rglob("*.svg"))
    if not sources:
        raise FileNotFoundError(f"no .svg files under {svg_root}: give the unpacked {PACKAGE} package root "
                                f"(the folder holding {SVG_DIR}) as --source, or leave --source out to fetch it")
    jobs = [(str(svg_root), s, size) for s in sources]
    items: list[Item] = []
    t0 = time.perf_counter()
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(process, jobs, chunksize=8) if pool else map(process, jobs)
        for n, item in enumerate(results, 1):  # imap keeps job order: the output does not depend on workers
            items.append(item)
            if progress and (n % 500 == 0 or n == len(jobs)):
                print(f"  {n}/{len(jobs)} files, {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    return items


def package_version(root: Path) -> str:
    """The package version from its Debian changelog ("1:0.18+dfsg-19"), or "unknown" when it has none."""
    changelog = root / DOC_DIR / "changelog.Debian.gz"
    if changelog.is_file():
        match = re.match(r"\S+ \(([^)]+)\)", gzip.decompress(changelog.read_bytes()).decode(errors="replace"))
        if match:
            return match.group(1)
    return "unknown"


def _prepare_out(out: Path) -> None:
    """Empty the split folders of an earlier build; refuse a non-empty folder that is not one."""
    if out.exists() and any(out.iterdir()) and not (out / "report.json").exists():
        raise ValueError(f"{out} is not empty and holds no report.json of an earlier clip-art build: "
                         "choose another --out folder (under cache/, which git ignores)")
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def write_split(out: Path, split: str, items: list[Item]) -> None:
    """PNGs numbered in path order plus metadata.jsonl (one JSON object a line, keys in a fixed order)."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, item in enumerate(items):
        name = f"{index:05d}.png"
        (folder / name).write_bytes(item.png)
        lines.append(json.dumps({"file_name": name, **item.row}, ensure_ascii=False))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n" if lines else "")


def build(root: Path, out: Path, config: BuildConfig = BuildConfig(), command: str = "",
          progress: bool = True) -> dict:
    """Build the set from an unpacked package tree `root` into `out`; returns the report (also report.json)."""
    t0 = time.perf_counter()
    svg_root = root / SVG_DIR
    if not svg_root.is_dir():
        raise FileNotFoundError(f"{svg_root} does not exist: --source must be the unpacked {PACKAGE} package "
                                f"root, the folder that holds {SVG_DIR}")
    items = process_all(svg_root, config.size, config.workers, progress)
    dropped = Counter(item.reason for item in items if item.reason)
    kept, limited = apply_limits([it for it in items if not it.reason], config.category_cap, None,
                                 config.caption_cap)
    dropped.update(limited)
    _prepare_out(out)
    by_split = {split: [it for it in kept if split_of(it.source) == split] for split in SPLITS}
    for split, split_items in by_split.items():
        write_split(out, split, split_items)
    copyright_file = root / DOC_DIR / "copyright"
    licence = copyright_file.read_text(errors="replace") if copyright_file.is_file() else ""
    (out / "LICENSE").write_text(licence)
    report = {
        "package": PACKAGE, "version": package_version(root), "files": len(items), "kept": len(kept),
        "splits": {split: len(v) for split, v in by_split.items()},
        "per_category": {split: dict(sorted(Counter(it.row["category"] for it in v).items()))
                         for split, v in by_split.items()},
        "dropped": dict(dropped.most_common()),
        "examples": [it.row["captions"] for it in sorted(kept, key=lambda it: _rank("ex" + it.source))[:20]],
        "config": dataclasses.asdict(config), "command": command,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "README.md").write_text(dataset_card(report, licence))
    return report


# ----------------------------------------------------------------------------- dataset card

def dataset_card(report: dict, licence: str) -> str:
    """The README.md of the set: splits for `datasets`, source, licence, counts, examples, drops, command."""
    configs = "\n".join(f"  - split: {s}\n    path: {s}/**" for s in SPLITS if report["splits"][s])
    categories = sorted(set().union(*report["per_category"].values()))
    table = ["| category | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
    table += [f"| {c} | " + " | ".join(str(report["per_category"][s].get(c, 0)) for s in SPLITS) + " |"
              for c in categories]
    table.append("| **all** | " + " | ".join(f"**{report['splits'][s]}**" for s in SPLITS) + " |")
    drops = "\n".join(f"| {reason} | {n} |" for reason, n in report["dropped"].items())
    examples = "\n".join(f"- {' / '.join(caps)}" for caps in report["examples"])
    quoted = "\n".join(f"> {line}".rstrip() for line in licence.strip().splitlines()) or "> (no copyright file)"
    return f"""---
license: cc0-1.0
configs:
- config_name: default
  data_files:
{configs}
---
# Captioned public-domain clip art ({report['package']} {report['version']})

{report['kept']} pictures rendered from Debian's `{report['package']}` package (version {report['version']},
{report['files']} SVG files), {report['config']['size']} px, drawn onto white and padded to a square. Captions
("{report['examples'][0][0] if report['examples'] else ''}") come from each SVG's RDF metadata (title, short
description, keywords), its folder and, when one colour clearly dominates, the picture's colour; never
from file names. `captions` holds 1-3 true phrasings, `text` the first. The split is a hash of the file's
path in the package (`heldout`: ~{HELDOUT_PERCENT}%, used for evaluation).

Built by `{report['command']}` (`data/clipart.py`) in {report['seconds']} s.

## Licence
openclipart.org pictures are in the public domain (Creative Commons Public Domain Dedication; the
package's copyright file is copied to `LICENSE`). It says:

{quoted}

## Pictures per category
{chr(10).join(table)}

## Captions (20 examples, all phrasings)
{examples}

## Files left out, by reason
| reason | files |
|---|---:|
{drops}
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="cache/clipart64", help="output folder (under cache/, never committed)")
    p.add_argument("--source", type=Path, default=None,
                   help=f"an unpacked {PACKAGE} package tree (holding {SVG_DIR}); default: fetch it with apt")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--workers", type=int, default=2, help="render processes")
    p.add_argument("--category-cap", type=int, default=CATEGORY_CAP, help="most pictures per top folder")
    p.add_argument("--caption-cap", type=int, default=CAPTION_CAP, help="most pictures sharing one caption")
    args = p.parse_args(argv)
    if args.size < 8 or args.workers < 1:
        p.error(f"--size {args.size} / --workers {args.workers}: need a size of at least 8 px and 1 worker")
    command = "python -m data.clipart " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    try:
        root = args.source if args.source else package_files(PACKAGE)
        config = BuildConfig(args.size, args.workers, args.category_cap, args.caption_cap)
        report = build(root, Path(args.out), config, command.strip())
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # the message says what to do
        p.error(str(e))
    print(f"kept {report['kept']} of {report['files']} files ({report['splits']}) in {args.out}, "
          f"{time.perf_counter() - t0:.1f} s")
    for reason, n in report["dropped"].items():
        print(f"  dropped {n:5d}  {reason}")


if __name__ == "__main__":
    main()
