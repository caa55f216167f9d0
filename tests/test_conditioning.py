"""conditioning/: the CLIP-format tokenizer, the frozen TextEncoder, and the small-CLIP pre-training.

Everything runs offline on tiny random models; the pre-training smoke run takes a few seconds.
"""

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPTokenizerFast,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from conditioning.text_encoder import TextEncoder
from conditioning.tokenizer import BOS, EOS, UNK, save_clip_tokenizer, train_clip_bpe
from data.loading import ImageTextPairs, LoadConfig, load_captioned, load_pairs
from pretrain_clip import PRESETS, add_shapes_phrasings, evaluate, main, retrieval_top1

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 90, 225), "yellow": (235, 210, 35)}
KINDS = ("circle", "square")
CAPTIONS = [f"a {size} {colour} {kind}" for size in ("small", "large") for colour in COLOURS for kind in KINDS]
CAPTIONS += ["a red circle above a blue square", "a green square left of a yellow circle"]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return train_clip_bpe(CAPTIONS * 3, model_max_length=12)


def tiny_text_model(tokenizer: CLIPTokenizer, hidden: int = 32) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


@pytest.fixture(scope="module")
def encoder(tokenizer, tmp_path_factory) -> TextEncoder:
    """Loaded back from a pipeline folder, the way the app loads it."""
    folder = tmp_path_factory.mktemp("pipeline")
    TextEncoder(tiny_text_model(tokenizer), tokenizer).save_pretrained(folder)
    return TextEncoder.from_pretrained(str(folder))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_files_load_with_from_pretrained_and_round_trip(tokenizer, tmp_path):
    save_clip_tokenizer(tokenizer, tmp_path / "full")
    assert (tmp_path / "full" / "merges.txt").read_text().startswith("#version: 0.2\n")
    # CLIP's own file set only (no tokenizer.json): what other CLIP tooling ships and reads
    clip_files = tmp_path / "clip_files"
    clip_files.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tmp_path / "full" / name, clip_files / name)
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        for folder in (tmp_path / "full", clip_files):
            loaded = cls.from_pretrained(folder)
            assert len(loaded) == len(tokenizer), (cls, folder)  # not the 3-token fallback vocabulary
            assert loaded.unk_token == UNK and loaded.model_max_length == 12
            for caption in CAPTIONS:
                ids = loaded(caption)["input_ids"]
                assert ids == tokenizer(caption)["input_ids"]
                assert loaded.decode(ids, skip_special_tokens=True) == caption
    # frequent words became single tokens: "a red circle" is start + 3 + end
    assert tokenizer.convert_ids_to_tokens(tokenizer("a red circle")["input_ids"]) == [
        BOS, "a</w>", "red</w>", "circle</w>", EOS]


def test_vocabulary_has_clip_layout_and_a_distinct_unknown_token(tokenizer):
    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    by_id = sorted(vocab, key=vocab.get)
    assert by_id[-3:] == [BOS, EOS, UNK]  # special tokens last, as in CLIP
    n_alpha = by_id.index("!</w>")  # alphabet, then the same alphabet with </w>
    assert [t + "</w>" for t in by_id[:n_alpha]] == by_id[n_alpha : 2 * n_alpha]
    assert "q" in vocab and "z</w>" in vocab  # printable ASCII even if no caption uses it
    assert tokenizer.unk_token_id != tokenizer.eos_token_id
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (EOS, BOS, EOS)


def test_train_clip_bpe_rejects_empty_captions():
    with pytest.raises(ValueError, match="no captions"):
        train_clip_bpe([])


# ----------------------------------------------------------------------------- TextEncoder.encode


def test_encode_shapes_mask_tokens_and_words(encoder):
    out = encoder.encode(["a red circle", "A small, blue square above a red circle", ""])
    assert encoder.hidden_size == 32 and encoder.max_length == 12
    lengths = [5, 11, 2]  # start + words (the comma is a word of its own) + end
    assert out.context.shape == (3, max(lengths), 32) and out.context.dtype == torch.float32
    assert out.mask.dtype == torch.bool and out.mask.sum(1).tolist() == lengths
    assert not out.mask[0, 5:].any()
    assert out.tokens[0] == [BOS, "a", "red", "circle", EOS]
    assert out.word_ids[0] == [None, 0, 1, 2, None]
    assert out.words[1] == ["a", "small", ",", "blue", "square", "above", "a", "red", "circle"]
    assert [out.words[1][w] for w in out.word_ids[1][1:-1]] == out.tokens[1][1:-1]  # lowercased
    assert out.truncated == [False, False, False] and out.unknown_words == [[], [], []]
    for b in range(3):
        assert len(out.tokens[b]) == len(out.word_ids[b]) == lengths[b]


def test_padding_in_a_mixed_batch_does_not_change_a_prompt(encoder):
    alone = encoder.encode("a red circle")
    batch = encoder.encode(["a small blue square above a red circle", "a red circle"])
    torch.testing.assert_close(batch.context[1, :5], alone.context[0], atol=1e-5, rtol=1e-5)


def test_word_spans_cover_words_split_into_several_tokens(encoder):
    out = encoder.encode("redcircle squares")  # neither is a caption word: BPE splits them
    assert out.words == [["redcircle", "squares"]]
    pieces = {w: "".join(t for t, i in zip(out.tokens[0], out.word_ids[0], strict=True) if i == w) for w in (0, 1)}
    assert pieces == {0: "redcircle", 1: "squares"}
    assert out.word_ids[0].count(0) > 1


def test_unknown_words_are_reported(encoder):
    out = encoder.encode(["a café circle 🙂", "a giraffe"])
    assert out.unknown_words[0] == ["café", "🙂"]
    assert UNK in out.tokens[0]
    # spelled with known characters: representable (split into pieces), so not unknown
    assert out.unknown_words[1] == []


def test_long_prompt_is_truncated_and_reported(encoder):
    long = " ".join(["a red circle"] * 6)  # 18 words + start/end > 12
    out = encoder.encode([long, "a red circle"])
    assert out.truncated == [True, False]
    assert out.context.shape[1] == encoder.max_length == 12
    assert out.tokens[0][-1] == EOS and out.mask[0].all()
    assert len(out.words[0]) == 10 and max(i for i in out.word_ids[0] if i is not None) == 9


def test_empty_prompt_is_start_and_end_only(encoder):
    out = encoder.encode("")
    assert out.tokens == [[BOS, EOS]] and out.words == [[]] and out.word_ids == [[None, None]]
    assert out.context.shape == (1, 2, 32)
    batch = encoder.encode(["", "a red circle"])
    torch.testing.assert_close(batch.context[0, :2], out.context[0], atol=1e-5, rtol=1e-5)


def test_encoder_is_frozen_and_its_output_feeds_a_trainable_layer(encoder):
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    context = encoder.encode("a red circle").context
    assert not context.requires_grad
    layer = torch.nn.Linear(32, 4)  # like the U-Net's cross-attention k/v projection
    layer(context).sum().backward()  # fails if encode ran under inference_mode
    assert layer.weight.grad is not None


def test_to_changes_dtype(tokenizer):
    enc = TextEncoder(tiny_text_model(tokenizer), tokenizer).to(dtype=torch.bfloat16)
    assert enc.encode("a red circle").context.dtype == torch.bfloat16 and enc.dtype == torch.bfloat16


def test_encode_rejects_non_strings(encoder):
    with pytest.raises(ValueError, match="string"):
        encoder.encode([])
    with pytest.raises(ValueError, match="string"):
        encoder.encode([1, 2])


# ----------------------------------------------------------------------------- any CLIP


def test_any_clip_width_loads_through_the_same_path(tokenizer, tmp_path):
    # a plain checkpoint folder (weights + tokenizer at the top level) of another width
    plain = tmp_path / "plain"
    tiny_text_model(tokenizer, hidden=48).save_pretrained(plain)
    save_clip_tokenizer(tokenizer, plain)
    enc = TextEncoder.from_pretrained(str(plain))
    assert enc.hidden_size == 48 and enc.encode(["a red circle", ""]).context.shape == (2, 5, 48)
    # a full CLIPModel checkpoint, like openai/clip-vit-base-patch32: only the text half is loaded
    full = tmp_path / "full_clip"
    text = tiny_text_model(tokenizer, hidden=64).config.to_dict()
    vision = dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(full)
    save_clip_tokenizer(tokenizer, full)
    enc = TextEncoder.from_pretrained(str(full))
    assert enc.hidden_size == 64
    ids = tokenizer("a red circle", return_tensors="pt")["input_ids"]
    expected = clip.text_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(enc.encode("a red circle").context, expected, atol=1e-5, rtol=1e-5)


def test_checkpoint_without_text_weights_is_refused(tokenizer, tmp_path):
    vision = CLIPVisionConfig(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2)
    CLIPVisionModel(vision).save_pretrained(tmp_path)
    save_clip_tokenizer(tokenizer, tmp_path)
    with pytest.raises(ValueError, match="not a CLIP text model"):
        TextEncoder.from_pretrained(str(tmp_path))
    # right architecture, wrong width for the saved weights: a config/weights mismatch, also refused
    model = tiny_text_model(tokenizer, hidden=48)
    model.save_pretrained(tmp_path / "text")
    config = json.loads((tmp_path / "text" / "config.json").read_text())
    (tmp_path / "text" / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    save_clip_tokenizer(tokenizer, tmp_path / "text")
    with pytest.raises(ValueError, match="not a CLIP text model"):
        TextEncoder.from_pretrained(str(tmp_path / "text"))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        TextEncoder.from_pretrained(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- pre-training


def make_caption_folder(root: Path, n_train: int, n_val: int, val_name: str = "validation") -> Path:
    """A tiny imagefolder: one coloured circle or square per 16 px image, captioned."""
    for split, n in (("train", n_train), (val_name, n_val)):
        if not n:
            continue
        (root / split).mkdir(parents=True)
        rows = []
        for i in range(n):
            colour, kind = list(COLOURS)[i % 4], KINDS[(i // 4) % 2]
            img = Image.new("RGB", (16, 16), "white")
            box = (2 + i % 3, 2 + i % 5, 12 + i % 3, 12 + i % 3)
            draw = ImageDraw.Draw(img)
            (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
            img.save(root / split / f"{i:03d}.png")
            rows.append({"file_name": f"{i:03d}.png", "text": f"a {colour} {kind}",
                         "captions": [f"a {colour} {kind}", f"an image of a {colour} {kind}"]})
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_load_pairs_reads_captions_and_resizes(tmp_path):
    root = make_caption_folder(tmp_path / "data", 4, 0)
    data = load_pairs(root, resolution=8)
    assert data.pixels.shape == (4, 3, 8, 8) and data.pixels.dtype == torch.uint8
    assert data.texts[0] == "a red circle" and data.captions[0] == ["a red circle", "an image of a red circle"]
    # the same pixels the batch loader gives (data.loading's one resize and crop), as uint8
    batch = load_captioned(root, LoadConfig(resolution=8))[0]["pixel_values"]
    assert torch.equal(data.pixels[0], batch.add(1).mul(127.5).round().to(torch.uint8))
    (root / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "000.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="no column 'text'"):
        load_pairs(root, resolution=8)


def test_shapes_judge_adds_every_true_phrasing_and_leaves_other_data_alone(tmp_path):
    root = make_caption_folder(tmp_path / "shapes", 1, 0)
    data = load_pairs(root, resolution=8)
    assert not add_shapes_phrasings(root, "train", data)  # no shapes_info.json: not the shapes set
    (root / "shapes_info.json").write_text("{}")
    row = {"file_name": "000.png", "text": "a red circle", "captions": ["a red circle"], "background": "white",
           "objects": [{"kind": "circle", "colour": "red", "size": "small", "row": 1, "col": 1,
                        "box": [12.0, 12.0, 18.0, 18.0]}]}
    (root / "train" / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    data = load_pairs(root, resolution=8)
    assert add_shapes_phrasings(root, "train", data, draws=64)
    assert data.captions[0][0] == "a red circle"
    assert {"a small red circle", "a red circle in the center"} <= set(data.captions[0])
    assert not any("blue" in c or "square" in c for c in data.captions[0])


class OracleCLIP(torch.nn.Module):
    """Embeds every caption and image as the one-hot of a class id, so retrieval is decided by the ids."""

    def __init__(self, text_class: dict[str, int], image_class: list[int]):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.text_class, self.image_class, self.cursor = text_class, image_class, 0

    def forward(self, input_ids, attention_mask, pixel_values):
        b = len(input_ids)
        texts = [self.text_class[t] for t in self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)]
        images = self.image_class[self.cursor : self.cursor + b]
        self.cursor += b
        one_hot = torch.nn.functional.one_hot
        return SimpleNamespace(text_embeds=one_hot(torch.tensor(texts), 8).float(),
                               image_embeds=one_hot(torch.tensor(images), 8).float())


def test_retrieval_top1_counts_true_descriptions_not_only_the_paired_item(tokenizer):
    texts = ["a red circle", "a blue square", "a red circle", "a green square"]
    data = ImageTextPairs(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), texts, [[t] for t in texts])
    model = OracleCLIP({"a red circle": 0, "a blue square": 1, "a green square": 2}, [0, 1, 0, 3])
    model.tokenizer = tokenizer
    scores = retrieval_top1(model, tokenizer, data, candidates=4)
    # text 3 ("a green square") matches no image (image 3 is class 3): the only miss text->image;
    # image 3 matches no caption and retrieves text 0 ("a red circle"): a miss image->text.
    assert scores["text_to_image_top1"] == 0.75 and scores["image_to_text_top1"] == 0.75
    # the two "a red circle" pairs tie; argmax picks the first, so pair 2 is not its exact partner
    assert scores["text_to_image_top1_exact"] == 0.5
    with pytest.raises(ValueError, match="candidates"):
        retrieval_top1(model, tokenizer, data, candidates=5)


@pytest.mark.slow
def test_pretraining_smoke_run_writes_files_that_load_and_encode(tmp_path, capsys):
    data = make_caption_folder(tmp_path / "data", 12, 8)
    out = tmp_path / "run"
    main(["--data", str(data), "--out", str(out), "--preset", "tiny", "--steps", "3", "--cpu"])
    for name in ("clip/config.json", "clip/model.safetensors", "clip/vocab.json", "clip/merges.txt",
                 "clip/preprocessor_config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "pretrain_config.json", "retrieval.json", "README.md",
                 "checkpoints/step_000003/model.safetensors", "checkpoints/step_000003/optimizer.safetensors",
                 "checkpoints/step_000003/state.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pkl", ".pt")]  # no pickles, checkpoints too
    assert "retrieval top-1 among 4" in capsys.readouterr().out

    enc = TextEncoder.from_pretrained(str(out))
    assert enc.hidden_size == 32 and enc.max_length == 16
    assert enc.encode(["a red circle", ""]).tokens[0] == [BOS, "a", "red", "circle", EOS]
    # the whole CLIP loads as a standard CLIPModel and scores with --eval
    assert CLIPModel.from_pretrained(out / "clip").config.vision_config.image_size == 32
    scores = evaluate(out, data, candidates=4)
    assert scores["pairs"] == 8 and 0.0 <= scores["text_to_image_top1"] <= 1.0

    # resume continues from the step-3 checkpoint instead of starting over
    main(["--data", str(data), "--out", str(out), "--resume", "--steps", "4", "--cpu"])
    assert "resumed from" in capsys.readouterr().out
    assert (out / "checkpoints" / "step_000004").is_dir()
    assert json.loads((out / "retrieval.json").read_text())["steps"] == 4


def test_resume_refuses_checkpoints_of_the_older_accelerate_format_and_says_what_to_do(tmp_path):
    data = make_caption_folder(tmp_path / "data", 12, 8)
    out = tmp_path / "run"
    old = out / "checkpoints" / "step_0000100"  # accelerate save_state, as pretrain_clip wrote before
    old.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
        (old / name).write_bytes(b"")
    (old / "progress.json").write_text('{"step": 100, "seconds": 1.0}')
    (out / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(PRESETS["tiny"])))
    save_clip_tokenizer(train_clip_bpe(CAPTIONS, vocab_size=300), out / "tokenizer")
    with pytest.raises(ValueError, match="older pretrain_clip .* start a new --out"):
        main(["--data", str(data), "--out", str(out), "--resume", "--cpu"])
    with pytest.raises(SystemExit):  # without --resume: the folder is taken
        main(["--data", str(data), "--out", str(out), "--cpu"])


# ----------------------------------------------------------------------------- several folders, a grown tokenizer

CLIPART = [("a red apple", "an apple"), ("a brown dog", "a dog"), ("a yellow duck", "a duck"), ("a green frog",)]


def make_clipart_folder(root: Path, n_train: int, n_heldout: int) -> Path:
    """A tiny data.clipart-like folder: train + heldout splits, 1-2 phrasings a picture, real words."""
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        (root / split).mkdir(parents=True)
        rows = []
        for i in range(n):
            captions = CLIPART[i % len(CLIPART)]
            img = Image.new("RGB", (24, 24), "white")
            colour = COLOURS[list(COLOURS)[i % 4]]
            ImageDraw.Draw(img).polygon([(2 + i % 4, 20), (12, 2 + i % 3), (22, 20)], fill=colour)
            img.save(root / split / f"{i:05d}.png")
            rows.append({"file_name": f"{i:05d}.png", "text": captions[0], "captions": list(captions)})
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_sources_share_every_batch_by_weight_and_read_their_own_rows(tmp_path):
    from pretrain_clip import load_sources

    art, shapes = make_clipart_folder(tmp_path / "art", 6, 4), make_caption_folder(tmp_path / "shapes", 10, 4)
    cfg = dataclasses.replace(PRESETS["tiny"], batch_size=8, data_weights=(0.75, 0.25), augment=(True, False))
    sources = load_sources([art, shapes], cfg)
    assert sources.augment.tolist() == [True] * 6 + [False] * 10 and sources.mirror_ok.all()
    assert sources.names == ["art", "shapes"] and sources.sizes == [6, 10] and sources.shares == [6, 2]
    assert list(sources.val) == ["art", "shapes"] and len(sources.val["art"]) == 4  # heldout read as validation
    def rows(sources, steps, skip=0):
        loaders = [iter(dl) for dl in sources.loaders(steps, seed=0)]
        for _ in range(skip):
            [next(dl) for dl in loaders]
        return [torch.cat([next(dl) for dl in loaders]).tolist() for _ in range(skip, steps)]

    batches = rows(sources, 3)
    for batch in batches:
        assert len(batch) == 8 and all(r < 6 for r in batch[:6]) and all(6 <= r < 16 for r in batch[6:])
    assert {r for batch in batches for r in batch[:6]} == set(range(6))  # each folder walks whole passes of its rows
    assert rows(sources, 3) == batches and rows(sources, 3, skip=1) == batches[1:]  # a resumed run reads the same
    assert rows(sources, 5)[:3] == batches  # a longer run reads the shorter one's batches first
    assert sources.train.texts[6] == "a red circle"
    # no weights: shares in proportion to the folders' sizes
    even = load_sources([art, shapes], dataclasses.replace(cfg, data_weights=()))
    assert even.shares == [3, 5]
    with pytest.raises(ValueError, match="one per folder"):
        load_sources([art], cfg)


def test_zoom_out_keeps_the_whole_drawing_on_white_and_mirrors_only_where_allowed():
    from conditioning.clip_images import zoom_out_on_white

    pixels = torch.full((64, 3, 16, 16), 255, dtype=torch.uint8)
    pixels[:, :, 4:12, 2:6] = 0  # a black bar left of centre
    out = zoom_out_on_white(pixels, torch.Generator().manual_seed(0), 0.5, flip=torch.arange(64) < 32)
    assert out.shape == pixels.shape and out.dtype == torch.uint8
    ink = (out < 128).any(dim=1)  # (B, 16, 16)
    assert (ink.sum(dim=(1, 2)) >= 0.5 * 0.5 * 32).all()  # the whole bar still in view, at least half size
    left = ink[:, :, :8].sum(dim=(1, 2)) > ink[:, :, 8:].sum(dim=(1, 2))
    assert left[32:].all()  # flip not allowed: the bar stays on the left
    assert not left[:32].all()  # allowed: some are mirrored
    widths = ink.any(dim=1).sum(dim=1)
    assert widths.min() < widths.max()  # zoomed by different factors
    again = zoom_out_on_white(pixels, torch.Generator().manual_seed(0), 0.5, flip=torch.arange(64) < 32)
    assert torch.equal(out, again)


def test_a_grown_tokenizer_keeps_the_old_ids_and_reads_common_words_whole(tokenizer, tmp_path):
    from pretrain_clip import make_tokenizer

    save_clip_tokenizer(tokenizer, tmp_path / "base")
    cfg = dataclasses.replace(PRESETS["tiny"], base_tokenizer=str(tmp_path / "base"), min_word_count=2)
    grown = make_tokenizer(cfg, ["a red apple", "an apple", "a red duck", "a duck", "a frog"])
    old = tokenizer.get_vocab()
    assert {t: grown.get_vocab()[t] for t in old} == old
    assert grown.tokenize("a red apple duck") == ["a</w>", "red</w>", "apple</w>", "duck</w>"]
    assert len(grown.tokenize("frog")) > 1  # used once: stays in pieces
    assert grown.model_max_length == cfg.max_length
    for caption in CAPTIONS:  # the old captions read exactly as before
        assert grown(caption)["input_ids"] == tokenizer(caption)["input_ids"]


@pytest.mark.slow
def test_clipart_training_path_runs_on_two_folders_and_resumes_exactly(tokenizer, tmp_path, capsys):
    from safetensors.torch import load_file

    art, shapes = make_clipart_folder(tmp_path / "art", 12, 4), make_caption_folder(tmp_path / "shapes", 12, 8)
    save_clip_tokenizer(tokenizer, tmp_path / "base")
    out = tmp_path / "run"
    args = ["--data", str(art), str(shapes), "--out", str(out), "--preset", "tiny", "--tokenizer",
            str(tmp_path / "base"), "--steps", "4", "--cpu"]
    main(args)
    printed = capsys.readouterr().out
    assert "art 12 train / 4 validation" in printed and "shapes: retrieval top-1 among 4" in printed
    grown = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert grown.tokenize("a brown dog") == ["a</w>", "brown</w>", "dog</w>"]
    assert {t: grown.get_vocab()[t] for t in tokenizer.get_vocab()} == tokenizer.get_vocab()
    result = json.loads((out / "retrieval.json").read_text())
    assert set(result["per_data"]) == {"art", "shapes"} and result["data"] == [str(art), str(shapes)]
    assert result["per_data"]["art"]["candidates"] == 4 and 0 < result["per_data"]["art"]["text_to_image_chance"] < 1
    assert "| art | 4 | 4 |" in (out / "README.md").read_text()
    assert TextEncoder.from_pretrained(str(out)).encode(["a brown dog"]).tokens[0] == [BOS, "a", "brown", "dog", EOS]
    straight = load_file(out / "clip" / "model.safetensors")

    # kill after step 2: the step-4 checkpoint is gone; resuming must give the very same weights
    shutil.rmtree(out / "checkpoints" / "step_000004")
    main(["--data", str(art), str(shapes), "--out", str(out), "--resume", "--cpu"])
    assert "resumed from" in capsys.readouterr().out
    resumed = load_file(out / "clip" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
