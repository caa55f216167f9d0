"""Reading relations however a prompt says them (diffusion/relations.py): which words are A and B, the axis
and the sign, keyed to the tokens of the prompt as typed; phrases it cannot read are said, not guessed."""

from types import SimpleNamespace

import pytest

from diffusion.grounding import has_relation, relation_pairs
from diffusion.layout import relation_notes
from diffusion.relations import read_relations
from tests.tiny import tiny_text_encoder

RED, BLUE = ["red", "circle"], ["blue", "square"]
ABOVE, BELOW, LEFT, RIGHT = (0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0)


def word_encoding(*captions: str) -> SimpleNamespace:
    """One token per word, with start/end tokens (as test_grounding's)."""
    words = [c.replace(",", " ,").split() for c in captions]
    return SimpleNamespace(words=words, word_ids=[[None, *range(len(w)), None] for w in words])


def read(prompt: str) -> list[tuple[list[str], list[str], int, float]]:
    """The relations of one prompt as layout guidance gets them: (A's words, B's words, axis, sign)."""
    enc = word_encoding(prompt)
    L = len(enc.word_ids[0])
    a_tokens, b_tokens, _, axis, sign = relation_pairs(enc, L, places=True)

    def named(row):
        return [enc.words[0][enc.word_ids[0][i]] for i in row.nonzero()[:, 0].tolist()]

    return [(named(a), named(b), int(x), float(s)) for a, b, x, s in zip(a_tokens, b_tokens, axis, sign, strict=True)]


@pytest.mark.parametrize("phrase, axis_sign", [
    ("above", ABOVE), ("over", ABOVE), ("on top of", ABOVE),
    ("below", BELOW), ("under", BELOW), ("beneath", BELOW), ("underneath", BELOW),
    ("to the left of", LEFT), ("left of", LEFT), ("on the left of", LEFT),
    ("to the right of", RIGHT), ("right of", RIGHT), ("on the right of", RIGHT),
])
def test_every_way_to_say_a_relation_between_two_objects(phrase, axis_sign):
    assert read(f"a red circle {phrase} a blue square") == [(RED, BLUE, *axis_sign)]
    # A is the phrase before, B the one after, whatever else the prompt holds
    assert read(f"a picture of two small blue squares {phrase} a large red circle , and a green cross at the top") == [
        (["small", "blue", "squares"], ["large", "red", "circle"], *axis_sign)]


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle at the top and a blue square at the bottom", [ABOVE]),
    ("a red circle at the bottom and a blue square at the top", [BELOW]),
    ("a red circle on the left and a blue square on the right", [LEFT]),
    ("a red circle on the right and a blue square on the left", [RIGHT]),
    ("a red circle in the top left and a blue square in the bottom right", [ABOVE, LEFT]),
    ("a red circle in the bottom right and a blue square in the top left", [BELOW, RIGHT]),
    ("a red circle in the top left and a blue square in the top right", [LEFT]),  # one row: a column order only
    ("a red circle in the center and a blue square at the top", [BELOW]),
    ("a red circle at the top, and a blue square at the bottom", [ABOVE]),
])
def test_two_places_are_a_relation_on_each_axis_they_order(prompt, expected):
    assert read(prompt) == [(RED, BLUE, *axis_sign) for axis_sign in expected]


@pytest.mark.parametrize("prompt", [
    "a red circle", "a red circle in the top left", "a red circle and a blue square",
    "a red circle at the top and a blue square at the top",  # the same row: no order
    "a red circle on the left and a blue square at the top",  # different axes: no order
    "a red circle on the table and a blue square on the left",
])
def test_no_relation_where_the_words_order_nothing(prompt):
    assert read(prompt) == [] and not has_relation(word_encoding(prompt).words[0], places=True)


def test_training_reads_two_places_as_places_not_a_relation():
    # The shapes captions place objects in cells with these phrases; training grounds those words alone.
    words = word_encoding("a red circle at the top and a blue square at the bottom").words[0]
    assert has_relation(words, places=True) and not has_relation(words)
    assert read_relations(words).relations == []


@pytest.mark.parametrize("prompt, unread", [
    ("a red circle next to a blue square", "next to"),
    ("a red circle behind a blue square", "behind"),
    ("a red circle in front of a blue square", "in front of"),
    ("a red circle beside a blue square", "beside"),
    ("a red circle at the top of a blue square", "at the top of"),
])
def test_phrases_it_cannot_read_are_reported_not_guessed(prompt, unread):
    reading = read_relations(word_encoding(prompt).words[0], places=True)
    assert reading.relations == [] and reading.unread == [unread]
    assert read(prompt) == []
    assert relation_notes(word_encoding(prompt)) == [
        f"guidance: '{unread}' is not a relation this model's guidance understands; it ran without relation guidance."]


def test_a_read_relation_beside_an_unread_one_is_still_guided():
    enc = word_encoding("a red circle above a blue square next to a green cross")
    assert read("a red circle above a blue square next to a green cross") == [(RED, BLUE, *ABOVE)]
    assert relation_notes(enc) == ["guidance: 'next to' is not a relation this model's guidance understands; "
                                   "only the relations it reads were guided."]
    assert relation_notes(word_encoding("a red circle above a blue square")) == []


def test_said_and_head_words_are_the_prompts_own():
    words = "a red circle on top of a blue square".split()
    (relation,) = read_relations(words).relations
    assert (words[relation.a], words[relation.b], relation.relation) == ("circle", "square", "above")
    assert [words[j] for j in relation.said] == ["on", "top", "of"] and [words[j] for j in relation.head] == ["top"]
    words = "a red circle in the bottom right and a blue square in the top left".split()
    first = read_relations(words, places=True).relations[0]
    assert [words[j] for j in first.said] == ["in", "the", "bottom", "right", "in", "the", "top", "left"]


def test_tokens_are_those_of_the_prompt_as_typed():
    """With a real tokenizer, a word it splits into pieces ("beneath" is 7 in the tiny one) keeps all its
    tokens, and A's and B's rows mark the tokens of the user's words, not of a rewritten prompt."""
    enc = tiny_text_encoder().encode(["Two RED circles beneath a square"])
    a_tokens, b_tokens, prompt_ids, axis, sign = relation_pairs(enc, enc.context.shape[1], places=True)
    assert prompt_ids.tolist() == [0] and axis.tolist() == [0] and sign.tolist() == [-1.0]
    words, ids = enc.words[0], enc.word_ids[0]
    assert words == ["two", "red", "circles", "beneath", "a", "square"]
    assert sum(i == 3 for i in ids) == 7  # "beneath", in pieces
    assert [i for i, m in enumerate(a_tokens[0].tolist()) if m] == [2, 3]  # "red", "circles": tokens 2 and 3
    assert [i for i, m in enumerate(b_tokens[0].tolist()) if m] == [12]  # "square", after beneath's pieces
    assert enc.tokens[0][12] == "square"
