"""What a model knows (diffusion/vocabulary.py): the caption summary saved beside it, the one unknown-word
check, and layout guidance only for a model whose captions are in a grammar it reads."""

import json
from pathlib import Path

import numpy as np
import pytest

from diffusion import grammar
from diffusion.layout import OBJECT_GUIDANCE, RELATION_GUIDANCE
from diffusion.pipeline import TextToImagePipeline
from diffusion.vocabulary import (
    CAPTIONS_FILE,
    GROUNDED_WORDS_NOTE,
    MAX_EXAMPLES,
    WHOLE_WORDS_SHOWN,
    WORDS_NOTE,
    CaptionSummary,
    example_prompts,
    knows_note,
    layout_grammar,
    layout_off_aside,
    model_card_text,
    spread,
    unknown_words,
    whole_words,
    word_maps_note,
    word_splitter,
)
from tests.tiny import OWN_CAPTIONS, tiny_pipeline

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "default"


@pytest.fixture(scope="module")
def own():
    """A tiny model of someone's own captions ("a polar bear on the ice"): no shapes grammar."""
    return tiny_pipeline(OWN_CAPTIONS, grammar=None)


@pytest.fixture(scope="module")
def shapes():
    return tiny_pipeline()


def pixels(result):
    return np.stack([np.asarray(im) for im in result.images])


# -- the summary -------------------------------------------------------------------------------------
def test_summary_counts_the_tokenizers_words_and_spreads_its_examples():
    captions = [f"A Polar bear, number {i}!" for i in range(100)] + ["a red apple"] * 50
    summary = CaptionSummary.from_captions(captions, source="made up")
    assert summary.num_captions == 150 and summary.grammar is None and summary.source == "made up"
    assert list(summary.word_counts)[:5] == ["a", "bear", "number", "polar", "apple"]  # most used first, then a–z
    assert summary.word_counts["polar"] == 100 and "," not in summary.word_counts and "!" not in summary.word_counts
    assert summary.word_counts["1"] == 20  # CLIP splits numbers digit by digit, as the model's tokenizer does
    assert len(summary.examples) == MAX_EXAMPLES and len(set(summary.examples)) == MAX_EXAMPLES
    assert summary.examples[0] == captions[0] and summary.examples[-1] == "a red apple"  # distinct, spread out
    assert summary.most_common(2) == [("a", 150), ("bear", 100)]
    assert CaptionSummary.from_captions(captions) == CaptionSummary.from_captions(captions, source=None)


def test_words_are_split_as_the_text_encoder_splits_them(shapes):
    prompt = "Two  RED circles, a crème square"  # within the tiny encoder's 16 tokens
    assert word_splitter(shapes.text_encoder.tokenizer)(prompt) == shapes.text_encoder.encode([prompt]).words[0]
    assert word_splitter()(prompt) == shapes.text_encoder.encode([prompt]).words[0]  # CLIP's split by default


def test_spread_keeps_first_and_last():
    assert spread(list(range(10)), 4) == [0, 3, 6, 9] and spread([1, 2], 5) == [1, 2] and spread([1, 2], 1) == [1]


def test_summary_round_trips_and_bad_files_say_what_to_do(tmp_path):
    summary = CaptionSummary.from_captions(["a polar bear", "a red apple"], source="test")
    path = summary.save(tmp_path)
    assert path == tmp_path / CAPTIONS_FILE and json.loads(path.read_text())["format"] == 1
    assert CaptionSummary.load(tmp_path) == summary
    with pytest.raises(FileNotFoundError, match="from_captions"):
        CaptionSummary.load(tmp_path / "elsewhere")
    path.write_text('{"examples": []}')
    with pytest.raises(ValueError, match="not a caption summary: it lacks num_captions, word_counts"):
        CaptionSummary.load(tmp_path)
    path.write_text(json.dumps({**json.loads(summary.save(tmp_path).read_text()), "format": 2}))
    with pytest.raises(ValueError, match="format 2, newer than this code reads"):
        CaptionSummary.load(tmp_path)
    with pytest.raises(ValueError, match="grammar 'english' is not one layout guidance reads"):
        CaptionSummary.from_captions(["a bear"], grammar="english")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        CaptionSummary.from_captions([])


def test_shipped_summary_is_small_in_the_shapes_grammar_and_matches_the_tokenizer():
    from transformers import CLIPTokenizer

    assert (SHIPPED / CAPTIONS_FILE).stat().st_size < 200_000
    summary = CaptionSummary.load(SHIPPED)
    assert summary.grammar == grammar.NAME and summary.num_captions > 1000 and "data.shapes" in summary.source
    assert len(summary.examples) == MAX_EXAMPLES
    words = set(whole_words(CLIPTokenizer.from_pretrained(SHIPPED / "tokenizer")))
    assert set(summary.word_counts) == words  # every caption word is a whole token, and every whole token was used
    assert grammar.CORE_WORDS <= words


# -- the one unknown-word check -------------------------------------------------------------------------
def test_unknown_words_are_those_never_seen_once_each_in_prompt_order():
    known = {"a", "red", "apple"}
    assert unknown_words(["a", "red", "zebra", ",", "okapi", "zebra", "2"], known) == ["zebra", "okapi"]
    assert unknown_words(["a", "red", "café"], known | {"café"}, unreadable=["café"]) == ["café"]


def test_a_model_of_its_own_words_warns_about_words_its_captions_never_used(own):
    result = own("a red circle by a bear", steps=1, seed=0)
    assert result.warnings == ["unknown words: circle, by. This model's training captions never used them, so "
                               "they steer little; see 'What this model knows'."]
    assert own("a polar bear on the ice", steps=1, seed=0).warnings == []


def test_without_a_summary_the_tokenizer_is_asked(own, shapes):
    bare = TextToImagePipeline(own.unet, own.text_encoder, own.scheduler_config)
    assert bare.captions is None and set(bare.known_words) == set(own.whole_words)
    assert {"a", "polar", "tea"} <= set(own.whole_words) and not {"olar", "les"} & set(own.whole_words)  # fragments
    (warning,) = bare("a polar bear on a zebra", steps=1, seed=0).warnings
    assert warning.startswith("unknown words: zebra. They are not whole words of this model's tokenizer")


# -- layout guidance only where the vocabulary makes sense of the prompt ----------------------------
def test_layout_grammar_comes_from_the_summary_or_else_the_tokenizer():
    shapes_words = grammar.CORE_WORDS | {"a", "two"}
    assert layout_grammar(CaptionSummary(1, [], {}, grammar="shapes"), []) == "shapes"
    assert layout_grammar(CaptionSummary(1, [], {}, grammar=None), shapes_words) is None  # the summary decides
    assert layout_grammar(None, shapes_words) == "shapes"
    assert layout_grammar(None, shapes_words - {"diamond"}) is None


def test_a_model_not_of_the_shapes_grammar_gets_no_layout_guidance_and_a_note(own):
    assert own.layout_grammar is None
    prompt = "a red apple above a polar bear"  # relation words of the shapes grammar, on another model
    plain = own(prompt, num_images=2, steps=3, seed=1)
    guided = own(prompt, num_images=2, steps=3, seed=1, relation_guidance=RELATION_GUIDANCE,
                 object_guidance=OBJECT_GUIDANCE)
    assert np.array_equal(pixels(plain), pixels(guided)) and not (guided.relation_guided or guided.object_guided)
    assert guided.guidance_notes == ["layout guidance is off: this model's captions are not in the shapes grammar."]
    assert plain.guidance_notes == []  # guidance not asked for: nothing to say
    with pytest.raises(ValueError, match="relation_guidance must be >= 0"):  # a bad strength is still refused
        own(prompt, steps=1, relation_guidance=-1.0)


def test_the_shapes_grammar_model_keeps_its_guidance_and_reads_new_phrasings(shapes):
    assert shapes.layout_grammar == "shapes"
    for prompt in ("a blue square above a green triangle", "a blue square over a green triangle",
                   "blue square on the left, red circle on the right"):  # the tiny encoder takes 16 tokens
        plain = shapes(prompt, num_images=1, steps=3, seed=1)
        guided = shapes(prompt, num_images=1, steps=3, seed=1, relation_guidance=RELATION_GUIDANCE,
                        object_guidance=OBJECT_GUIDANCE)
        assert guided.relation_guided and not guided.object_guided and guided.guidance_notes == [], prompt
        assert not np.array_equal(pixels(plain), pixels(guided)), prompt
    unread = shapes("a blue square next to a green triangle", steps=3, seed=1, relation_guidance=RELATION_GUIDANCE,
                    object_guidance=OBJECT_GUIDANCE)
    assert not unread.relation_guided and unread.object_guided  # two objects, no relation read: the object term
    assert unread.guidance_notes == ["guidance: 'next to' is not a relation this model's guidance understands; it "
                                     "ran without relation guidance."]


def test_captions_travel_with_the_pipeline_folder(own, tmp_path):
    own.save_pretrained(tmp_path)
    assert (tmp_path / CAPTIONS_FILE).is_file()
    loaded = TextToImagePipeline.from_pretrained(tmp_path, dtype="fp32")
    assert loaded.captions == own.captions and loaded.layout_grammar is None
    (tmp_path / CAPTIONS_FILE).unlink()  # an older folder: the tokenizer stands in
    assert TextToImagePipeline.from_pretrained(tmp_path, dtype="fp32").captions is None


# -- examples -----------------------------------------------------------------------------------------------
def test_examples_come_from_the_models_own_captions(own):
    examples = example_prompts(own.captions, own.layout_grammar)
    assert examples == spread(list(dict.fromkeys(OWN_CAPTIONS)), 6)
    assert example_prompts(own.captions, None, count=2, max_chars=20) == ["two green apples"]  # the only short one
    # no summary: the shapes examples only for a model that reads that grammar, else none
    assert example_prompts(None, "shapes") == list(grammar.EXAMPLES) and example_prompts(None, None) == []


# -- what a model knows, told to people ----------------------------------------------------------------------
def knows(pipe, **kwargs) -> str:
    return knows_note(pipe.captions, pipe.whole_words, pipe.layout_grammar, **kwargs)


def test_the_pipelines_whole_words_are_whole_words_only(shapes):
    words = shapes.whole_words
    assert {"red", "circle", "above", "square", "a"} <= set(words)
    assert all(w.isalpha() and (len(w) > 1 or w == "a") for w in words)
    assert "zebra" not in words and "red" in knows(shapes)


def test_what_a_model_knows_is_its_captions_words_and_whether_layout_guidance_reads_it(own, shapes):
    note = knows(own)
    assert "**18 captions**" in note and "polar (6)" in note and "circle" not in note
    assert f"in **{len(own.captions.word_counts)} different words**" in note and "more" not in note
    assert f"Its tokenizer holds **{len(own.whole_words)} whole words**" in note
    assert "Layout guidance is off: this model's captions are not in the shapes grammar" in note
    assert "Layout guidance reads its prompts in the shapes grammar" in knows(shapes)
    most = own.captions.most_common(2)
    assert f"(times used): {most[0][0]} ({most[0][1]}), {most[1][0]} ({most[1][1]}), … and " \
           f"{len(own.captions.word_counts) - 2} more." in knows(own, limit=2)


def test_without_a_caption_summary_the_tokenizers_words_are_the_guide(own):
    bare = TextToImagePipeline(own.unet, own.text_encoder, own.scheduler_config)
    note = knows(bare)
    assert "no summary of its training captions (captions.json)" in note and "polar" in note
    assert "tokenizer lacks the shapes words" in note
    many = [f"word{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(WHOLE_WORDS_SHOWN + 5)]
    note = knows_note(None, many, None)
    assert many[WHOLE_WORDS_SHOWN - 1] in note and many[WHOLE_WORDS_SHOWN] not in note and "… and 5 more." in note


def test_the_notes_beside_the_controls_follow_the_models_grammar(own, shapes):
    assert layout_off_aside(shapes.captions, shapes.layout_grammar) == ""
    assert layout_off_aside(own.captions, own.layout_grammar) == (
        " (layout guidance is off: this model's captions are not in the shapes grammar.)")
    assert "tokenizer lacks the shapes words" in layout_off_aside(None, None)
    assert word_maps_note(shapes.layout_grammar) == GROUNDED_WORDS_NOTE and "grounding loss" in GROUNDED_WORDS_NOTE
    assert word_maps_note(own.layout_grammar) == WORDS_NOTE and "grounding" not in WORDS_NOTE


def test_a_model_card_is_shown_without_its_front_matter():
    card = "---\nlicense: mit\ntags: [diffusion]\n---\n\n# A small model\n\nIt draws shapes.\n"
    assert model_card_text(card) == "# A small model\n\nIt draws shapes."
    assert model_card_text("# No front matter\n") == "# No front matter"
    assert model_card_text(None) == model_card_text("") == "This model folder has no model card (README.md)."
