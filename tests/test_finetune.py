"""Fine-tuning on someone's own words: the tokenizer grows, the text side trains, and both resume and export."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

import train
from conditioning.tokenizer import grow_tokenizer
from diffusion.pipeline import TextToImagePipeline
from tests.tiny import CAPTIONS, tiny_pipeline, tiny_text_encoder

OWN = ["a polar bear", "a red apple", "a shopping cart", "a polar bear on ice", "a green apple", "a yellow taxi"]


def test_grown_tokenizer_reads_new_words_whole_and_old_texts_as_before(tmp_path):
    old = tiny_text_encoder().tokenizer
    grown, added = grow_tokenizer(old, OWN)
    assert {"polar", "bear", "apple", "shopping", "cart", "taxi"} <= set(added)
    assert "red" not in added  # already a whole token
    for word in added:
        assert grown.tokenize(word) == [word + "</w>"]
    for text in [*CAPTIONS, "a purple giraffe", "zebra crossing"]:  # old words and unseen ones: split as before
        if not set(text.split()) & set(added):
            assert grown(text)["input_ids"] == old(text)["input_ids"]
    old_vocab = old.get_vocab()
    assert all(grown.get_vocab()[t] == i for t, i in old_vocab.items())  # old ids never move
    assert grown.bos_token_id == old.bos_token_id and grown.eos_token_id == old.eos_token_id

    # CLIP's format: vocab.json + merges.txt that transformers' CLIPTokenizer loads like any CLIP
    from conditioning.tokenizer import save_clip_tokenizer

    save_clip_tokenizer(grown, tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again("a polar bear")["input_ids"] == grown("a polar bear")["input_ids"]


def test_min_count_keeps_rare_words_in_pieces():
    grown, added = grow_tokenizer(tiny_text_encoder().tokenizer, OWN, min_count=2)
    assert set(added) == {"polar", "bear", "apple"}
    assert len(grown.tokenize("taxi")) > 1


def test_growing_the_encoder_keeps_old_prompts_and_starts_words_from_their_pieces():
    enc = tiny_text_encoder()
    before = enc.encode(["a red circle", "a blue square above a green triangle"]).context
    pieces = enc.tokenizer("apple", add_special_tokens=False)["input_ids"]
    table = enc.model.get_input_embeddings().weight.detach().clone()
    added = enc.grow(OWN)
    assert "apple" in added and enc.model.config.vocab_size == len(enc.tokenizer)
    after = enc.encode(["a red circle", "a blue square above a green triangle"]).context
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    new_row = enc.model.get_input_embeddings().weight[enc.tokenizer.convert_tokens_to_ids("apple</w>")]
    assert new_row.norm() > 0
    # built by merging its old pieces pairwise: it lies inside their span (a mean of means)
    span = table[pieces].T  # (D, pieces)
    coefficients = torch.linalg.pinv(span) @ new_row.detach()
    torch.testing.assert_close(span @ coefficients, new_row.detach(), rtol=0, atol=1e-5)
    assert coefficients.sum().item() == pytest.approx(1.0, abs=1e-4)  # an average of the pieces
    assert enc.encode("a polar bear").tokens[0] == ["<|startoftext|>", "a", "polar", "bear", "<|endoftext|>"]


@pytest.mark.parametrize("what, trains", [("frozen", set()), ("embeddings", {"table"}), ("full", {"table", "body"})])
def test_text_side_gradients_reach_what_is_trained(what, trains):
    enc = tiny_text_encoder()
    enc.grow(OWN)
    enc.set_trainable(what)
    context = enc.encode(["a polar bear", "a red apple"]).context
    if not trains:
        assert not context.requires_grad
        return
    context.square().sum().backward()
    table = enc.model.get_input_embeddings().weight
    bear = enc.tokenizer.convert_tokens_to_ids("bear</w>")
    assert table.grad[bear].abs().sum() > 0  # the new word's own row learns
    assert table.grad[enc.tokenizer.convert_tokens_to_ids("taxi</w>")].abs().sum() == 0  # unused rows don't
    body = [p for n, p in enc.model.named_parameters() if "token_embedding" not in n]
    assert all((p.grad is not None) == ("body" in trains) for p in body)


def test_unknown_text_training_mode_is_refused():
    with pytest.raises(ValueError, match="choose one of frozen, embeddings, full"):
        tiny_text_encoder().set_trainable("lora")
    with pytest.raises(ValueError, match="text_encoder_training"):
        train.TrainConfig(text_encoder_training="lora")


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory):
    """Six captioned pictures in a person's own words, 20 px (not the model's 16: resized on load)."""
    root = tmp_path_factory.mktemp("own")
    folder = root / "pictures"
    folder.mkdir()
    colours = [(240, 240, 250), (200, 20, 20), (60, 60, 60), (230, 230, 240), (20, 160, 40), (240, 200, 0)]
    with (folder / "metadata.jsonl").open("w") as f:
        for i, (caption, colour) in enumerate(zip(OWN, colours, strict=True)):
            im = Image.new("RGB", (20, 20), "white")
            im.paste(colour, (4 + i, 4, 14 + i, 16))
            im.save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    tiny_pipeline().save_pretrained(root / "init")
    return root


def fine_tune(root, out, *extra):
    train.main(["--init", str(root / "init"), "--data", str(root / "pictures"), "--out", str(out),
                "--batch-size", "4", "--warmup", "1", "--checkpoint-every", "2", "--validate-every", "100",
                "--mixed-precision", "no", "--validation-steps", "2", *extra])


def test_one_line_fine_tune_learns_the_words_and_exports_a_clip_that_loads_anywhere(own_folder, capsys):
    out = own_folder / "run"
    fine_tune(own_folder, out, "--steps", "3")
    assert "6 pictures of 20x20 px, resized to 16 px; 6 distinct captions" in capsys.readouterr().out
    state = json.loads((out / "checkpoints" / "step_000003" / "state.json").read_text())
    cfg = state["config"]
    assert cfg["text_encoder_training"] == "embeddings" and cfg["grow_tokenizer"] is True
    assert cfg["resolution"] == 16  # the --init U-Net's size; the 20 px pictures are resized
    assert "a polar bear" in cfg["validation_prompts"] or "a red apple" in cfg["validation_prompts"]
    assert (out / "checkpoints" / "step_000003" / "tokenizer" / "vocab.json").is_file()

    pipe_dir = out / "pipeline"
    pipe = TextToImagePipeline.from_pretrained(pipe_dir, dtype="fp32")
    assert pipe.text_encoder.tokenizer.tokenize("polar bear") == ["polar</w>", "bear</w>"]
    tokenizer = CLIPTokenizer.from_pretrained(pipe_dir / "tokenizer")  # as any CLIP loads
    model = CLIPTextModel.from_pretrained(pipe_dir / "text_encoder")
    assert model.config.vocab_size == len(tokenizer) and tokenizer.tokenize("cart") == ["cart</w>"]
    base = tiny_pipeline().text_encoder.model.state_dict()
    trained = model.state_dict()
    table = "embeddings.token_embedding.weight"  # grown by the new words, and trained
    assert trained[table].shape[0] > base[table].shape[0]
    assert not torch.equal(base[table], trained[table][: base[table].shape[0]])
    assert pipe("a polar bear", steps=2, seed=0).images[0].size == (16, 16)
    # what the app shows as what the model knows: its own captions, and no shapes guidance on them
    assert pipe.captions.grammar is None and pipe.captions.word_counts["polar"] == 2
    assert set(pipe.captions.examples) == set(OWN) and pipe.layout_grammar is None
    assert not pipe("a polar bear", steps=2, seed=0).warnings  # words it learned are not "unknown"
    assert any("giraffe" in w for w in pipe("a polar giraffe", steps=2, seed=0).warnings)


def test_fine_tune_resumes_the_text_side_exactly(own_folder, monkeypatch):
    fine_tune(own_folder, own_folder / "straight", "--steps", "4")
    real_loss = train.diffusion_loss
    calls = {"n": 0}

    def dies_at_step_3(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_loss(*a, **kw)

    monkeypatch.setattr(train, "diffusion_loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(own_folder, own_folder / "resumed", "--steps", "4")
    monkeypatch.setattr(train, "diffusion_loss", real_loss)
    fine_tune(own_folder, own_folder / "resumed", "--steps", "4")
    for name in ("unet", "text_encoder", "ema", "optimizer"):
        a = load_file(own_folder / "straight" / "checkpoints" / "step_000004" / f"{name}.safetensors")
        b = load_file(own_folder / "resumed" / "checkpoints" / "step_000004" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # --export-only from the checkpoint gives the run's own export (EMA weights, grown tokenizer)
    train.main(["--out", str(own_folder / "resumed"), "--export-only", "--export-dtype", "fp32"])
    pipe = TextToImagePipeline.from_pretrained(own_folder / "resumed" / "pipeline", dtype="fp32")
    assert pipe.captions is not None and pipe.captions.examples  # the summary travels in the checkpoint
    ema = load_file(own_folder / "resumed" / "checkpoints" / "step_000004" / "ema.safetensors")
    unet_params = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert len(ema) == len(unet_params) + 1  # the text side trains its token embeddings by default
    assert torch.equal(pipe.text_encoder.model.get_input_embeddings().weight, ema[str(len(unet_params))])


def test_resuming_with_other_settings_is_refused(own_folder):
    out = own_folder / "changed"
    fine_tune(own_folder, out, "--steps", "2")
    with pytest.raises(ValueError, match="other settings .*text_encoder_training"):
        fine_tune(own_folder, out, "--steps", "3", "--text-encoder-training", "full")


def test_validation_prompts_come_from_the_captions():
    prompts = train.validation_prompts(["A yellow lemon", "A red kangaroo", "A frog", "An old clock", "A tree"] * 2)
    assert prompts[:2] == ["A yellow lemon", "A red kangaroo"][: len(prompts[:2])]
    assert "a yellow kangaroo" in prompts


def test_a_fine_tune_at_another_resolution_samples_at_it(own_folder, capsys):
    out = own_folder / "bigger"
    fine_tune(own_folder, out, "--steps", "2", "--resolution", "20")  # the tiny --init U-Net was built at 16 px
    assert "6 pictures of 20x20 px, used at 20 px" in capsys.readouterr().out  # nothing resized: not said
    pipe = TextToImagePipeline.from_pretrained(out / "pipeline", dtype="fp32")  # loads strictly
    base = tiny_pipeline().unet.config
    levels = range(len(base.channel_mults))
    assert pipe.unet.config.sample_size == 20
    assert [pipe.unet.config.level_has_attention(i) for i in levels] == [base.level_has_attention(i) for i in levels]
    assert pipe("a red apple", steps=2, seed=0).images[0].size == (20, 20)


def test_a_base_larger_than_32_px_fine_tunes_at_32_unless_told(own_folder, capsys):
    big = tiny_pipeline()
    big.unet = train.at_resolution(big.unet, 64)  # a 64 px base, like weights/clipart
    big.save_pretrained(own_folder / "init64")
    args = ["--init", str(own_folder / "init64"), "--data", str(own_folder / "pictures"), "--batch-size", "2",
            "--steps", "1", "--validate-every", "100", "--mixed-precision", "no", "--validation-steps", "2"]
    train.main([*args, "--out", str(own_folder / "auto")])
    assert "at 32 px, not its 64 px" in capsys.readouterr().out
    assert TextToImagePipeline.from_pretrained(own_folder / "auto" / "pipeline").unet.config.sample_size == 32
    train.main([*args, "--out", str(own_folder / "kept"), "--resolution", "64"])
    assert TextToImagePipeline.from_pretrained(own_folder / "kept" / "pipeline").unet.config.sample_size == 64


def test_at_resolution_keeps_the_weights_and_the_levels_with_attention():
    unet = tiny_pipeline().unet  # 16 px, attention at its 8 px level only
    x, t, context = torch.randn(1, 3, 24, 24), torch.tensor([10]), torch.randn(1, 5, unet.config.context_dim)
    for size in (8, 24, 64):
        resized = train.at_resolution(unet, size)
        assert resized.config.sample_size == size
        assert [resized.config.level_has_attention(i) for i in (0, 1)] == [False, True]
        assert torch.equal(resized(x, t, context), unet(x, t, context))
