"""Reading "A above B" however a prompt says it: the relation, and which of its words are A and B.

The shapes captions say a relation one way ("A above B", "A to the left of B"); people also write
"A over B", "A on top of B", "A beneath B", "A at the top and B at the bottom". The relation loss and
layout guidance (diffusion/grounding.py, diffusion/layout.py) take one of four canonical relations
(`grammar.RELATIONS`) between two noun phrases, so every phrasing here is read as one of those.

Nothing is rewritten: the parser walks the prompt's own words (as the tokenizer split them) and returns
word indices into them, so A's and B's tokens are those of the prompt the user typed and the maps
keep labelling the user's words.

Two kinds of phrasing:
- a relation phrase between two noun phrases, `RELATION_PHRASES`: "A under B" is "A below B";
- two place phrases, "A at the top and B at the bottom" (with `places=True`): each object's place
  ("in the top left" = row 0, column 0; "at the top" = row 0, any column) gives a relation on every
  axis where both are placed and differ, read from the object named first: A above B here, and
  "A in the top left and B in the bottom right" is both A above B and A left of B.
Phrases that sound like a relation but say none of these ("next to", "behind", "at the top of") are
returned as not understood, so the caller can say so instead of guiding something else.
"""

from dataclasses import dataclass

from diffusion.grammar import NOUNS, PLACE_WORDS

# Each way to say a relation, as words, and the canonical relation it says (of A, the phrase before).
RELATION_PHRASES: dict[tuple[str, ...], str] = {
    ("above",): "above", ("over",): "above", ("on", "top", "of"): "above",
    ("below",): "below", ("under",): "below", ("beneath",): "below", ("underneath",): "below",
    ("to", "the", "left", "of"): "left of", ("left", "of"): "left of", ("on", "the", "left", "of"): "left of",
    ("to", "the", "right", "of"): "right of", ("right", "of"): "right of", ("on", "the", "right", "of"): "right of",
}
# Words of a phrase that only join it to the sentence; the others carry its meaning (its head).
JOINING_WORDS = frozenset({"to", "the", "on", "of", "in", "at"})
# Phrases people use for a relation that none of the four canonical ones says.
UNREAD_PHRASES = (("next", "to"), ("beside",), ("besides",), ("near",), ("behind",), ("in", "front", "of"),
                  ("between",), ("inside",), ("around",), ("across", "from"), ("opposite",), ("among",))
PLACE_PREPOSITIONS = frozenset({"in", "at", "on"})  # "in the top left", "at the top", "on the left"
# A place word's grid coordinate: (axis, index) with axis 0 rows, 1 columns, on the 3 × 3 grid.
PLACE_COORDINATES = {"top": (0, 0), "bottom": (0, 2), "left": (1, 0), "right": (1, 2)}
# The relation of A to B on an axis when A's coordinate is the smaller.
SMALLER = {0: ("above", "below"), 1: ("left of", "right of")}
# The relation's axis (0 rows, 1 columns) and +1 where A's coordinate is the smaller (image y grows down).
RELATION_AXES = {"above": (0, 1.0), "below": (0, -1.0), "left of": (1, 1.0), "right of": (1, -1.0)}


@dataclass(frozen=True)
class Relation:
    """"A <relation> B" in a prompt's words.

    a, b: the word index of A's and B's noun (their phrases end there: diffusion.grounding.phrase_tokens).
    relation: the canonical relation of A to B ("above", "below", "left of", "right of").
    said: the word indices of the words that say it ("on top of"; "at the top" and "at the bottom").
    head: those of them that carry its meaning ("top" of "on top of", "left" of "to the left of").
    """

    a: int
    b: int
    relation: str
    said: tuple[int, ...]
    head: tuple[int, ...]

    @property
    def axis(self) -> int:
        """0 for above/below (rows), 1 for left/right of (columns)."""
        return RELATION_AXES[self.relation][0]

    @property
    def sign(self) -> float:
        """+1 where A's coordinate is the smaller ("above", "left of"), −1 otherwise."""
        return RELATION_AXES[self.relation][1]


@dataclass(frozen=True)
class Reading:
    """What the parser made of one prompt: the relations it read and the phrases it could not read."""

    relations: list[Relation]
    unread: list[str]


def read_relations(words: list[str], places: bool = False) -> Reading:
    """The relations in a prompt's words (lowercased, as the tokenizer split them).

    places: also read two placed objects as a relation ("A at the top and B at the bottom"). The
    relation loss of training leaves it off: the shapes captions place objects in cells with those
    phrases, and the position words are grounded on their own there.
    """
    relations, taken, unread = _phrase_relations(words)
    if places:
        placed, unread_places = _placed_objects(words, taken)
        relations += _place_relations(placed)
        unread += unread_places
    return Reading(relations, list(dict.fromkeys(unread)))


def _phrase_relations(words: list[str]) -> tuple[list[Relation], set[int], list[str]]:
    """Relations said by a phrase between two nouns; the word indices the phrases take; unread phrases."""
    relations, taken, unread = [], set(), []
    i = 0
    while i < len(words):
        phrase = _match(words, i, RELATION_PHRASES)
        if phrase is None:
            if (other := _match(words, i, UNREAD_PHRASES)) is not None:
                unread.append(" ".join(other))
            i += 1
            continue
        span = range(i, i + len(phrase))
        a = next((j for j in range(i - 1, -1, -1) if words[j] in NOUNS), None)
        b = next((j for j in range(span.stop, len(words)) if words[j] in NOUNS), None)
        if a is not None and b is not None:
            said = tuple(span)
            relations.append(Relation(a, b, RELATION_PHRASES[phrase], said, _head(words, said)))
            taken.update(span)
        i = span.stop
    return relations, taken, unread


def _match(words: list[str], i: int, phrases) -> tuple[str, ...] | None:
    """The longest phrase that starts at words[i], or None."""
    found = [p for p in phrases if tuple(words[i:i + len(p)]) == p]
    return max(found, key=len, default=None)


def _head(words: list[str], said: tuple[int, ...]) -> tuple[int, ...]:
    """The word indices of `said` that carry its meaning (the relation loss grounds those in training)."""
    return tuple(j for j in said if words[j] not in JOINING_WORDS)


@dataclass(frozen=True)
class _Placed:
    noun: int
    said: tuple[int, ...]  # "at the top"
    head: tuple[int, ...]  # "top"
    cell: tuple[int | None, int | None]  # (row, column), None on an axis the phrase leaves open


def _placed_objects(words: list[str], taken: set[int]) -> tuple[list[_Placed], list[str]]:
    """Nouns followed by a place phrase ("circle at the top", "square in the bottom right"), in prompt
    order. A place phrase followed by "of" ("at the top of a tree") places nothing: it is returned as unread."""
    placed, unread = [], []
    for noun in (j for j, w in enumerate(words) if w in NOUNS):
        preposition, the = noun + 1, noun + 2
        opening = words[preposition:the + 1]  # "at the"
        if len(opening) < 2 or opening[0] not in PLACE_PREPOSITIONS or opening[1] != "the":
            continue
        stop = the + 1
        while stop < len(words) and stop - the <= 2 and words[stop] in PLACE_WORDS:  # one or two place words
            stop += 1
        said = tuple(range(preposition, stop))
        if stop == the + 1 or taken & set(said):  # "on the table"; the "on the left" of "on the left of"
            continue
        if words[stop:stop + 1] == ["of"]:
            unread.append(" ".join(words[preposition:stop + 1]))
            continue
        placed.append(_Placed(noun, said, _head(words, said), _cell([words[j] for j in said])))
    return placed, unread


def _cell(words: list[str]) -> tuple[int | None, int | None]:
    """The grid cell a place phrase names, None on an axis it leaves open: "in the center" is (1, 1),
    "at the top" (0, None), "in the bottom right" (2, 2)."""
    cell: list[int | None] = [None, None]
    for w in words:
        if w in PLACE_COORDINATES:
            axis, index = PLACE_COORDINATES[w]
            cell[axis] = index
    if "center" in words:  # the middle on every axis no other word names
        cell = [1 if c is None else c for c in cell]
    return cell[0], cell[1]


def _place_relations(placed: list[_Placed]) -> list[Relation]:
    """A relation for each pair of placed objects (the first named is A) and each axis on which both are
    placed in different cells."""
    out = []
    for i, first in enumerate(placed):
        for second in placed[i + 1:]:
            for axis in (0, 1):
                p, q = first.cell[axis], second.cell[axis]
                if p is None or q is None or p == q:
                    continue
                relation = SMALLER[axis][0] if p < q else SMALLER[axis][1]
                said = first.said + second.said
                out.append(Relation(first.noun, second.noun, relation, said, first.head + second.head))
    return out
