"""The sampling pipeline: determinism, samplers, guidance, negative prompts, emphasis, maps, export."""

import json
import threading

import numpy as np
import pytest
import torch

from core.precision import cpu_has_fast_bf16, inference_dtype
from diffusion.maps import normalize_maps, overlay
from diffusion.pipeline import TextToImagePipeline
from diffusion.prompts import parse_emphasis
from diffusion.sampling import SAMPLERS, guided_model
from tests.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_same_seed_same_images_and_per_image_seeds(pipe):
    a = pipe("a red circle", num_images=3, steps=3, seed=11)
    b = pipe("a red circle", num_images=3, steps=3, seed=11)
    assert a.seeds == [11, 12, 13]
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert not np.array_equal(pixels(a.images[:1]), pixels(a.images[1:2]))
    alone = pipe("a red circle", num_images=1, steps=3, seed=12)  # image 1 remade on its own
    assert np.array_equal(pixels(alone.images), pixels(a.images[1:2]))


def test_random_seed_is_reported(pipe):
    result = pipe("a red circle", steps=2)
    again = pipe("a red circle", steps=2, seed=result.seed)
    assert np.array_equal(pixels(result.images), pixels(again.images))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_and_gives_finite_images(pipe, sampler):
    result = pipe("a blue square", steps=4, seed=0, sampler=sampler)
    assert result.images[0].size == (16, 16) and result.images[0].mode == "RGB"
    assert pixels(result.images).std() > 0


def test_samplers_differ_and_unknown_sampler_is_refused(pipe):
    ddim = pixels(pipe("a blue square", steps=4, seed=0, sampler="ddim").images)
    dpm = pixels(pipe("a blue square", steps=4, seed=0, sampler="dpm++").images)
    assert not np.array_equal(ddim, dpm)
    with pytest.raises(ValueError, match="dpm\\+\\+"):
        pipe("a blue square", steps=2, sampler="plms")


def test_guidance_math():
    def fake_unet(x, t, context, mask, weights):  # "prediction" = the mean of the context, per row
        return x * 0 + context.mean(dim=(1, 2))[:, None, None, None]

    context = torch.stack([torch.full((3, 4), 1.0), torch.full((3, 4), 3.0)])  # uncond 1, cond 3
    mask = torch.ones(2, 3, dtype=torch.bool)
    x = torch.zeros(1, 3, 4, 4)
    for scale, expected in [(1.0, 3.0), (0.0, 1.0), (2.5, 1 + 2.5 * 2)]:
        out = guided_model(fake_unet, context, mask, scale)(x, torch.tensor(5))
        torch.testing.assert_close(out, torch.full_like(x, expected))


def test_guidance_batches_the_two_texts_of_each_image_in_one_call(pipe):
    """guided_model calls the U-Net once per step on [x; x] under [negative; prompt] (k-diffusion's
    make_cfg_model_fn): the U-Net itself knows nothing of guidance."""
    seen = []

    def unet(x, t, context, mask, weights):
        seen.append((x.shape[0], tuple(t.shape), torch.equal(x[:2], x[2:])))
        return pipe.unet(x, t, context, mask, weights)

    enc = pipe.text_encoder.encode(["", "", "a red circle", "a blue square"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor(500)
    with torch.no_grad():
        guided = guided_model(unet, enc.context, enc.mask, 4.0)(x, t)
        out = pipe.unet(torch.cat([x, x]), t, enc.context, enc.mask)
    assert seen == [(4, (4,), True)]
    uncond, cond = out.chunk(2)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond))


def test_negative_prompt_replaces_the_empty_prompt(pipe, monkeypatch):
    seen = []
    forward = pipe.sampling_unet.forward
    monkeypatch.setattr(pipe.sampling_unet, "forward",
                        lambda x, t, c, m, w, **kw: seen.append(c) or forward(x, t, c, m, w, **kw))
    pipe("a red circle", negative_prompt="a blue square", steps=1, seed=0)
    pipe("a red circle", steps=1, seed=0)
    negative = pipe.text_encoder.encode(["a blue square"]).context[0]
    empty = pipe.text_encoder.encode([""]).context[0]
    torch.testing.assert_close(seen[0][0, : negative.shape[0]], negative)
    torch.testing.assert_close(seen[1][0, : empty.shape[0]], empty)


def test_callback_sees_every_step(pipe):
    calls = []
    pipe("a red circle", steps=5, seed=0, callback=lambda step, t, steps: calls.append((step, t, steps)))
    assert [c[0] for c in calls] == [0, 1, 2, 3, 4] and all(c[2] == 5 for c in calls)
    # Trailing spacing starts at the last training step (DPM++ clips the few with log-SNR < -5.1).
    assert calls[0][1] >= 990 and calls[0][1] > calls[-1][1]


@pytest.mark.parametrize(
    "kwargs,message",
    [({"steps": 0}, "steps"), ({"num_images": 0}, "num_images"), ({"prompt": []}, "prompt"),
     ({"negative_prompt": ["a", "b"]}, "negative prompts"), ({"prompt": "a (red:99) circle"}, "outside")],
)
def test_bad_arguments_raise_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": "a red circle", "steps": 2, **kwargs})


def test_unknown_words_are_reported(pipe):
    result = pipe("a red círcle", steps=1, seed=0)
    assert any("círcle" in w and "unknown" in w for w in result.warnings)


def test_emphasis_syntax():
    assert parse_emphasis("a (red:1.5) circle") == ("a red circle", {"red": 1.5})
    assert parse_emphasis("(big red:0.5) (square)") == ("big red (square)", {"big": 0.5, "red": 0.5})
    assert parse_emphasis("plain") == ("plain", {})


def test_emphasis_is_visible_in_the_maps(pipe):
    plain = pipe("a red circle", steps=2, seed=0, record_attention=True).attention
    strong = pipe("a (red:3) circle", steps=2, seed=0, record_attention=True).attention
    layer = plain.layers("cross")[0]  # the first cross layer sees identical features in both runs
    red = plain.words(0).index("red") + 1  # token index (after <start>)
    ratio = strong.token_maps(0, layer=layer)[red].sum() / plain.token_maps(0, layer=layer)[red].sum()
    assert ratio == pytest.approx(3.0, rel=1e-3)


@pytest.fixture(scope="module")
def result(pipe):
    """Two prompts × two images, recorded in 3 bins over 6 steps, with a negative prompt."""
    return pipe(["a red circle", "a small purple zebra"], negative_prompt="a green triangle", num_images=2,
                steps=6, seed=1, record_attention=True, attention_bins=3)


class TestMaps:
    def test_layers_bins_and_tokens(self, result, pipe):
        maps = result.attention
        assert maps.layers("cross") == [n for n in pipe.unet.attention_layers if n.endswith("cross_attn")]
        assert [list(b) for b in maps.bins] == [[0, 1], [2, 3], [4, 5]]
        assert maps.tokens(0) == ["<start>", "a", "red", "circle", "<end>"]
        assert maps.tokens(0, negative=True)[1:-1] == ["a", "green", "triangle"]
        assert maps.words(2) == ["a", "small", "purple", "zebra"]

    def test_token_maps_are_probabilities(self, result):
        maps = result.attention
        for layer in maps.layers("cross"):
            tm = maps.token_maps(0, layer=layer)  # (L, H, W); each pixel's attention sums to 1
            assert tm.shape == (5, 16, 16)
            torch.testing.assert_close(tm.sum(0), torch.ones(16, 16), rtol=1e-4, atol=1e-4)
        head = maps.token_maps(0, head=1)
        assert head.shape == (5, 16, 16) and not torch.allclose(head, maps.token_maps(0))

    def test_sub_tokens_merge_into_words(self, result):
        maps = result.attention
        tokens = maps.tokens(2)
        assert len(tokens) > len(maps.words(2)) + 2  # "zebra" is not in the vocabulary as one token
        words = maps.word_maps(2, normalize="absolute")
        raw = maps.token_maps(2)
        zebra = [i for i, w in enumerate(result.word_ids[2]) if w == 3]
        assert len(zebra) > 1
        expected = raw[zebra].sum(0) / max(m.max() for m in [raw[i] for i in range(1, len(tokens) - 1)] +
                                           [raw[zebra].sum(0)])
        assert list(words) == ["a", "small", "purple", "zebra"]
        torch.testing.assert_close(words["zebra"], expected, rtol=1e-4, atol=1e-5)

    def test_special_tokens_toggle(self, result):
        maps = result.attention
        assert "<start>" not in maps.word_maps(0)
        assert list(maps.word_maps(0, include_special=True)) == ["<start>", "a", "red", "circle", "<end>"]

    def test_normalisations(self, result):
        maps = result.attention.word_maps(0, normalize="minmax")
        for m in maps.values():
            assert m.min() == pytest.approx(0, abs=1e-6) and m.max() == pytest.approx(1, abs=1e-6)
        absolute = result.attention.word_maps(0, normalize="absolute")
        assert max(m.max() for m in absolute.values()) == pytest.approx(1)
        shares = result.attention.word_maps(0, normalize="tokens")
        torch.testing.assert_close(sum(shares.values()), torch.ones(16, 16))
        with pytest.raises(ValueError, match="minmax"):
            normalize_maps(maps, "log")

    def test_bins_and_negative_maps_differ(self, result):
        maps = result.attention
        assert not torch.allclose(maps.token_maps(0, bins=[0]), maps.token_maps(0, bins=[2]))
        negative = maps.word_maps(0, negative=True)
        assert list(negative) == ["a", "green", "triangle"]

    def test_self_attention_for_a_pixel(self, result):
        maps = result.attention
        layer = maps.layers("self")[0]
        m = maps.self_attention(1, layer, (3, 12))
        assert m.shape == (16, 16) and m.max() == pytest.approx(1)
        assert not torch.allclose(m, maps.self_attention(1, layer, (12, 3)))
        with pytest.raises(ValueError, match="outside"):
            maps.self_attention(1, layer, (16, 0))
        with pytest.raises(KeyError, match="no self-attention"):
            maps.self_attention(1, maps.layers("cross")[0], (0, 0))

    def test_overlay(self, result):
        heat = result.attention.word_maps(0)["red"]
        img = overlay(result.images[0], heat, alpha=0.5, size=64)
        assert img.size == (64, 64) and img.mode == "RGB"
        with pytest.raises(ValueError, match="alpha"):
            overlay(result.images[0], heat, alpha=2)

    def test_export(self, result, tmp_path):
        paths = result.attention.export(tmp_path, result.images, size=32)
        names = {p.name for p in paths}
        assert {"maps.json", "maps.npz", "image0.png", "image0_red.png", "image3_zebra.png"} <= names
        meta = json.loads((tmp_path / "maps.json").read_text())
        assert meta["seed"] == 1 and meta["steps"] == 6 and meta["prompts"][2] == "a small purple zebra"
        # Self-attention at each bin's middle step (the pipeline's default), cross-attention at every step.
        assert meta["self_attention_steps"] == [[1], [3], [5]]
        store = result.attention.store
        assert {store._counts[(result.attention.layers("self")[0], b)] for b in range(3)} == {1}
        assert {store._counts[(result.attention.layers("cross")[0], b)] for b in range(3)} == {2}
        assert {layer["name"] for layer in meta["layers"]} >= set(result.attention.layers("cross"))
        arrays = np.load(tmp_path / "maps.npz", allow_pickle=False)
        layer = result.attention.layers("cross")[0]
        assert arrays[f"image0.{layer}"].shape[0] == 3  # one map per timestep bin
        assert arrays["image1.words"].shape == (3, 16, 16) and arrays["image1.words"].dtype == np.float16
        assert not [k for k in arrays.files if "self_attn" in k]  # only when asked
        assert meta["exported_layers"] == result.attention.layers("cross")
        result.attention.export(tmp_path / "with_self", self_attention=True)
        arrays = np.load(tmp_path / "with_self" / "maps.npz", allow_pickle=False)
        self_layer = result.attention.layers("self")[0]
        N = arrays[f"image0.{self_layer}"].shape[1]
        assert arrays[f"image0.{self_layer}"].shape == (3, N, N)
        np.testing.assert_allclose(arrays[f"image0.{self_layer}"].astype(np.float32).sum(-1), 1, atol=3e-3)

    def test_word_summary_says_where_each_word_looked(self, result):
        summary = result.attention.word_summary(0)
        assert list(summary) == list(result.attention.word_maps(0))
        assert sum(w["share"] for w in summary.values()) == pytest.approx(1, abs=0.01)
        H, W = result.attention.image_size
        for word in summary.values():
            assert 0 <= word["peak"][0] < H and 0 <= word["peak"][1] < W
            assert 0 <= word["centre"][0] <= H - 1 and 0 <= word["centre"][1] <= W - 1
            assert word["region"] in {"top left", "top", "top right", "left", "centre", "right", "bottom left",
                                      "bottom", "bottom right"}

        from diffusion.maps import _region

        assert [_region(0.1, 0.1), _region(0.5, 0.5), _region(0.99, 0.5), _region(0.5, 1.0)] == [
            "top left", "centre", "bottom", "right"]


def test_memory_of_maps_is_flat_in_steps(pipe):
    sizes = [pipe("a red circle", steps=s, seed=0, record_attention=True).attention.store.nbytes() for s in (4, 12)]
    assert sizes[0] == sizes[1]


def test_bf16_sampling_stays_close_to_fp32(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    fp32 = TextToImagePipeline.from_pretrained(tmp_path, dtype="fp32")
    bf16 = TextToImagePipeline.from_pretrained(tmp_path, dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.text_encoder.model.dtype == torch.float32
    a = fp32("a red circle above a blue square", num_images=2, steps=6, seed=1, record_attention=True)
    b = bf16("a red circle above a blue square", num_images=2, steps=6, seed=1, record_attention=True)
    diff = np.abs(pixels(a.images).astype(float) - pixels(b.images).astype(float))
    assert diff.mean() < 4, diff.mean()  # of 255
    for w, m in a.attention.word_maps(0).items():
        assert torch.allclose(m, b.attention.word_maps(0)[w], atol=0.02)
    with pytest.raises(ValueError, match="fp16 on a CPU"):
        TextToImagePipeline.from_pretrained(tmp_path, dtype="fp16")


def test_cpu_bf16_detection_reads_the_flags():
    assert cpu_has_fast_bf16("flags : fpu avx512f avx512_bf16 avx512vl")
    assert cpu_has_fast_bf16("flags : fpu amx_bf16 amx_tile")
    assert not cpu_has_fast_bf16("flags : fpu avx2 avx512f avx512bw")


def test_save_and_load_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"unet", "text_encoder", "tokenizer", "scheduler"}
    loaded = TextToImagePipeline.from_pretrained(tmp_path, dtype="fp32")
    a = pipe("a red circle", steps=3, seed=4).images
    b = loaded("a red circle", steps=3, seed=4).images
    assert np.array_equal(pixels(a), pixels(b))
    assert loaded.folder == tmp_path and pipe.folder is None  # where a fine-tune of it would start from
    assert TextToImagePipeline.from_pretrained(tmp_path).dtype == inference_dtype("cpu")  # "auto"
    with pytest.raises(FileNotFoundError, match="unet/"):
        TextToImagePipeline.from_pretrained(tmp_path / "unet")


def test_calls_from_two_threads_keep_their_own_maps(pipe):
    prompts = ["a red circle", "a blue square above a green triangle"]
    alone = [pipe(p, steps=3, seed=2, record_attention=True) for p in prompts]
    results = [None, None]

    def run(i):
        results[i] = pipe(prompts[i], steps=3, seed=2, record_attention=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, results, strict=True):
        assert np.array_equal(pixels(a.images), pixels(b.images))
        for w, m in a.attention.word_maps(0).items():
            assert torch.equal(m, b.attention.word_maps(0)[w])
