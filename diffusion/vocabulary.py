"""What a model knows: a summary of its training captions, saved beside it, and its tokenizer's words.

A model draws what its training captions described. The tokenizer alone cannot say what that was: a
byte-level BPE splits any word into known pieces, and a fine-tuned tokenizer holds words its base saw
too. So every pipeline folder carries `captions.json`, a `CaptionSummary` written when the model is
exported (train.py) from the captions it trained on:

    summary = CaptionSummary.from_captions(captions, grammar=None, tokenizer=tokenizer)
    summary.save("runs/mine/pipeline")           # runs/mine/pipeline/captions.json
    CaptionSummary.load("runs/mine/pipeline").most_common(5)   # [("a", 812), ("bear", 96), …]

From it (or, for an older folder without one, from the tokenizer's whole words) come the app's example
prompts, its "What this model knows" (`knows_note`), the one check for prompt words the model never saw
(`unknown_words`), and whether layout guidance may read the prompts (`layout_grammar`: only a model
whose captions are in a grammar it understands, today the shapes grammar of diffusion/grammar.py). The notes
that tell people so (`knows_note`, `layout_off_aside`, `word_maps_note`, `model_card_text`) are Markdown text
for any front end; none imports one.
"""

import json
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from diffusion.grammar import CORE_WORDS as SHAPES_CORE_WORDS
from diffusion.grammar import EXAMPLES as SHAPES_EXAMPLES
from diffusion.grammar import NAME as SHAPES

CAPTIONS_FILE = "captions.json"
FORMAT = 1  # bumped when a field changes meaning
MAX_EXAMPLES = 64
GRAMMARS = (SHAPES,)  # the caption grammars layout guidance reads


@dataclass
class CaptionSummary:
    """The training captions of a model, summarised.

    Attributes:
        num_captions: how many training captions were summarised (repeats included).
        examples: up to `MAX_EXAMPLES` distinct captions, spread evenly over the training order.
        word_counts: {word: uses}, most used first; words are lowercased and split as the model's
            tokenizer splits them (EncodedPrompts.words), punctuation left out.
        grammar: the caption grammar the captions are written in, when layout guidance reads it
            ("shapes"), else None.
        source: how the captions were gathered, for people (e.g. the command that made them).
    """

    num_captions: int
    examples: list[str]
    word_counts: dict[str, int]
    grammar: str | None = None
    source: str | None = None

    def __post_init__(self):
        if self.grammar is not None and self.grammar not in GRAMMARS:
            raise ValueError(f"grammar {self.grammar!r} is not one layout guidance reads; use one of "
                             f"{list(GRAMMARS)}, or None for captions in any other words.")

    @classmethod
    def from_captions(cls, captions: Iterable[str], grammar: str | None = None, *, tokenizer=None,
                      source: str | None = None) -> "CaptionSummary":
        """Summarise training captions. tokenizer: the model's (its normaliser and word split; the
        default is CLIP's, which every CLIP tokenizer shares)."""
        captions = list(captions)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError("from_captions needs the training captions as a non-empty list of strings; "
                             "check the caption column of the data.")
        split = word_splitter(tokenizer)
        counts = Counter(w for caption in captions for w in split(caption) if any(ch.isalnum() for ch in w))
        return cls(num_captions=len(captions), examples=spread(list(dict.fromkeys(captions)), MAX_EXAMPLES),
                   word_counts=dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))),
                   grammar=grammar, source=source)

    def save(self, folder: str | Path) -> Path:
        """Write `captions.json` into a pipeline folder; returns its path."""
        path = Path(folder) / CAPTIONS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT, **asdict(self)}, indent=1, ensure_ascii=False)
        path.write_text(text + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "CaptionSummary":
        """Read `captions.json` from a pipeline folder."""
        path = Path(folder) / CAPTIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: write it with CaptionSummary.from_captions(captions)"
                                    f".save({str(folder)!r}) from the captions the model trained on.")
        data = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in ("num_captions", "examples", "word_counts") if k not in data]
        if missing:
            raise ValueError(f"{path} is not a caption summary: it lacks {', '.join(missing)}. Rewrite it with "
                             "CaptionSummary.from_captions(captions).save(folder).")
        if data.get("format", FORMAT) > FORMAT:
            raise ValueError(f"{path} has format {data['format']}, newer than this code reads ({FORMAT}); update "
                             "the code, or rewrite it with this version's CaptionSummary.from_captions(...).save().")
        return cls(**{k: data[k] for k in ("num_captions", "examples", "word_counts", "grammar", "source")
                      if k in data})

    def most_common(self, n: int) -> list[tuple[str, int]]:
        """The n words the captions used most, with their counts."""
        return list(self.word_counts.items())[:n]


def spread(items: list, k: int) -> list:
    """k items evenly spaced over the list, first and last included (all of them when there are ≤ k)."""
    if len(items) <= k:
        return list(items)
    if k == 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def word_splitter(tokenizer=None):
    """text -> its words as the tokenizer splits them (normalised, e.g. lowercased), as EncodedPrompts.words."""
    if tokenizer is None:
        from transformers import CLIPTokenizer  # CLIP's normaliser and word split, no vocabulary needed

        tokenizer = CLIPTokenizer()
    backend = tokenizer.backend_tokenizer
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer

    def split(text: str) -> list[str]:
        text = normalizer.normalize_str(text) if normalizer is not None else text
        # Byte-level pieces are not readable text; their offsets into the normalised text are.
        return [text[start:end] for _, (start, end) in pre_tokenizer.pre_tokenize_str(text)]

    return split


def whole_words(tokenizer) -> list[str]:
    """Whole alphabetic words of the tokenizer ("red</w>"), sorted: what it can hold as one token.

    Word-final tokens also include BPE fragments ("ange</w>" of "or" + "ange</w>") and the single
    letters of the base alphabet; both are dropped: a fragment is the right half of some merge. ("a" is
    kept, though "a</w>" ends "tea"; a word that also ends a longer one, "range" of "orange", is missed,
    which is why the caption summary, where there is one, says what the model learned.)
    """
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
    right_halves = {(m.split(" ") if isinstance(m, str) else m)[1] for m in merges}
    words = {t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and (t == "a</w>" or t not in right_halves)}
    return sorted(w for w in words if w.isalpha() and (len(w) > 1 or w == "a"))


def layout_grammar(summary: CaptionSummary | None, known_whole: Collection[str]) -> str | None:
    """The caption grammar layout guidance may read this model's prompts in, or None (guidance off).

    The summary says it; a folder without one counts as the shapes grammar when its tokenizer holds
    every shapes kind, colour and relation word whole (the shipped model before captions.json existed).
    """
    if summary is not None:
        return summary.grammar
    return SHAPES if SHAPES_CORE_WORDS <= set(known_whole) else None


def layout_off_note(summary: CaptionSummary | None) -> str:
    """The status line of a model layout guidance does not read."""
    why = ("this model's captions are not in the shapes grammar" if summary is not None else
           f"this model's folder has no {CAPTIONS_FILE} and its tokenizer lacks the shapes words")
    return f"layout guidance is off: {why}."


def unknown_words(words: list[str], known: Collection[str], unreadable: Iterable[str] = ()) -> list[str]:
    """The prompt's words the model never saw, in prompt order, once each.

    words: the prompt's words (EncodedPrompts.words). known: the words of its training captions (or,
    without a caption summary, its tokenizer's whole words). unreadable: words with characters the
    tokenizer cannot encode at all (EncodedPrompts.unknown_words), reported whatever `known` says.
    """
    unreadable = set(unreadable)
    return list(dict.fromkeys(w for w in words if w in unreadable or (w.isalpha() and w not in known)))


def unknown_words_warning(unknown: list[str], from_captions: bool) -> str:
    """The one warning about prompt words a model never saw (from_captions: they were checked against its
    caption summary, not only its tokenizer)."""
    why = ("This model's training captions never used them" if from_captions else
           "They are not whole words of this model's tokenizer (it most likely never saw them)")
    return f"unknown words: {', '.join(unknown)}. {why}, so they steer little; see 'What this model knows'."


def example_prompts(summary: CaptionSummary | None, layout: str | None, count: int = 6,
                    max_chars: int | None = None) -> list[str]:
    """A handful of prompts this model was trained on: its summary's examples, spread out; for a model
    without one, the shapes grammar's examples when it reads that grammar, else none."""
    if summary is not None and summary.examples:
        fitting = [e for e in summary.examples if max_chars is None or len(e) <= max_chars]
        return spread(fitting, count)
    return list(SHAPES_EXAMPLES[:count]) if layout == SHAPES else []


# -- what a model knows, told to people -----------------------------------------------------------
KNOWN_WORDS_SHOWN = 60  # "What this model knows": the most used caption words listed …
WHOLE_WORDS_SHOWN = 400  # … or, for a model without a caption summary, its tokenizer's whole words

# How to read the word maps. Models of the shapes grammar were trained with a grounding loss on their colour,
# shape and size words (diffusion/grounding.py and weights/default/README.md); other models' words were not.
GROUNDED_WORDS_NOTE = (
    "How to read these: the shipped model was trained to point its colour, shape and size words at their "
    "objects (a grounding loss; see the model card). Other words (*a*, *two*, *above*, *on*, *background*) "
    "were not. Each word's vector also carries the rest of the prompt (CLIP reads left to right, and the "
    "U-Net's context layer mixes the whole prompt), so an ungrounded word often lights up an object named "
    "near it."
)
WORDS_NOTE = (
    "How to read these: each word's vector carries the rest of the prompt too (CLIP reads left to right, and the "
    "U-Net's context layers, where it has them, mix the whole prompt), so a word often lights up an object named "
    "near it."
)


def knows_note(summary: CaptionSummary | None, whole: list[str], layout: str | None,
               limit: int = KNOWN_WORDS_SHOWN) -> str:
    """'What this model knows' (Markdown): the words its training captions used most (or, without a summary, its
    tokenizer's whole words `whole`), how many whole words its tokenizer holds, and whether layout guidance reads
    its prompts (`layout`: its layout_grammar)."""
    if summary is not None:
        shown = ", ".join(f"{w} ({n:,})" for w, n in summary.most_common(limit))
        more = len(summary.word_counts) - limit
        learned = (f"It was trained on **{summary.num_captions:,} captions** in **{len(summary.word_counts):,} "
                   f"different words**, and draws what they described. The words they used most (times used): "
                   f"{shown}{f', … and {more:,} more' if more > 0 else ''}.")
    else:
        more = len(whole) - WHOLE_WORDS_SHOWN
        shown = ", ".join(whole[:WHOLE_WORDS_SHOWN]) + (f", … and {more:,} more" if more > 0 else "")
        learned = (f"This model's folder has no summary of its training captions ({CAPTIONS_FILE}), so what they "
                   f"said is not known here; its tokenizer's whole words are the best guide: {shown}.")
    tokenizer = (f"Its tokenizer holds **{len(whole):,} whole words**; other words are split into pieces, and a "
                 f"warning lists the prompt words the model never learned.")
    off = layout_off_note(summary)
    layout = ("Layout guidance reads its prompts in the shapes grammar (relations, counts and places)."
              if layout == SHAPES else off[0].upper() + off[1:])
    return "\n\n".join([learned, tokenizer, layout])


def layout_off_aside(summary: CaptionSummary | None, layout: str | None) -> str:
    """' (why layout guidance does not read this model's prompts)', to follow a description of the guidance; ''
    for a model whose prompts it reads."""
    return "" if layout == SHAPES else f" ({layout_off_note(summary)})"


def word_maps_note(layout: str | None) -> str:
    """How to read a model's word maps: what its training pointed its words at (the shapes grammar's models were
    trained with a grounding loss), and why a word lights up objects named near it."""
    return GROUNDED_WORDS_NOTE if layout == SHAPES else WORDS_NOTE


def model_card_text(card: str | None) -> str:
    """A model card (the README.md beside the weights) for readers: without the Hub's YAML front matter."""
    card = card or "This model folder has no model card (README.md)."
    if card.startswith("---"):  # YAML front matter is for the Hub, not for readers
        card = card.split("---", 2)[-1]
    return card.strip()
