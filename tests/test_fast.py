"""The CPU sampling path (unet/fast.py) computes what the plain model computes, and leaves it alone."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny import randomize_
from unet import AttentionStore, UNet, UNetConfig
from unet.fast import (
    NCHW_ROUND_TRIP_MAX_NUMEL,
    FastGroupNorm,
    PackedConv2d,
    is_channels_last,
    optimize_for_inference,
    packed_conv_supports,
)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def fast_twin(module: torch.nn.Module, cls) -> torch.nn.Module:
    """A copy of a plain module as the fast path swaps it."""
    twin = copy.deepcopy(module)
    twin.__class__ = cls
    twin.prepare()
    return twin


CONFIGS = {
    # attention at 8×8 only: a whole level and a downsample before the first attention
    "tiny": UNetConfig.preset("tiny"),
    # a context refiner and position embeddings, attention at both levels
    "text layers": UNetConfig(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolution=16,
                              sample_size=16, num_heads=2, context_dim=32, context_layers=1, position_embedding=True),
    # nothing reads the text at all
    "no attention": UNetConfig(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolution=4,
                               sample_size=16, num_heads=2, context_dim=32),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_optimized_unet_computes_what_the_plain_one_does_and_records_the_same_maps(name, dtype, tol):
    plain = randomize_(UNet(CONFIGS[name]), std=0.1).eval().to(dtype)
    fast = optimize_for_inference(plain)
    x = torch.randn(3, 3, 16, 24).to(dtype)
    t = torch.tensor([10, 400, 900])
    context = torch.randn(3, 5, 32).to(dtype)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    weights = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0]] * 3).to(dtype)
    outs, stores = [], []
    for model in (plain, fast):
        store = AttentionStore(num_steps=1, context_layers=True)
        with torch.inference_mode(), model.record_attention(store):
            store.set_step(0)
            outs.append(model(x, t, context, mask, weights))
            again = model(x, t, context, mask, weights)  # the fast path's text side comes from its cache
        torch.testing.assert_close(again, outs[-1], rtol=0, atol=0)
        stores.append(store)
    assert outs[1].is_contiguous() and outs[1].dtype == dtype  # callers get NCHW back
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=tol, atol=tol)
    assert list(stores[0].layers) == list(stores[1].layers)
    assert {n for n, layer in plain.attention_layers.items() if layer.kind != "self"} <= set(stores[0].layers)
    for layer in stores[0].layers:
        torch.testing.assert_close(stores[1].mean(layer), stores[0].mean(layer), rtol=tol, atol=tol)


def test_optimize_for_inference_leaves_the_model_alone_and_keeps_its_state_dict():
    plain = randomize_(UNet(CONFIGS["text layers"]))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    fast = optimize_for_inference(plain)
    assert type(plain) is UNet and plain.training and all(p.requires_grad for p in plain.parameters())
    assert all(type(m).__module__ != "unet.fast" for m in plain.modules())
    state = fast.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    copy.deepcopy(fast)  # packed weights and caches are plain attributes, not parameters


def test_optimized_unet_refuses_autograd():
    fast = optimize_for_inference(UNet(CONFIGS["tiny"]))
    with pytest.raises(RuntimeError, match="only without autograd"):
        fast(torch.randn(1, 3, 16, 16), 10, torch.randn(1, 4, 32))


def test_text_side_is_reused_only_for_the_same_tensor_objects():
    plain = randomize_(UNet(CONFIGS["text layers"]), std=0.1).eval()
    fast = optimize_for_inference(plain)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    context, other = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.inference_mode():
        for c in (context, other, context, context.clone()):
            torch.testing.assert_close(fast(x, t, c, mask), plain(x, t, c, mask), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast(x, t, context, None), plain(x, t, context, None), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (3, 32, 16, 16), (1, 128, 4, 6), (2, 64, 32, 32)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_group_norm_on_channels_last_matches_pytorch(shape, dtype, tol):
    """Every path (per-channel sums, the NCHW round trip for small bf16, PyTorch's own kernel from 1,024
    positions), with and without FiLM, against the norm then FiLM in fp32."""
    norm = fast_twin(randomize_(torch.nn.GroupNorm(32, shape[1])), FastGroupNorm).to(dtype)
    x = (torch.randn(shape) * 3 + 1.5).to(dtype)  # an offset mean: E[x²] − mean² must not lose it
    scale, shift = torch.randn(2, shape[0], shape[1], dtype=dtype) * 0.1
    expected = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)
    with torch.inference_mode():
        out, film = norm(channels_last(x)), norm.modulated(channels_last(x), scale, shift)
    assert is_channels_last(out) and is_channels_last(film) and out.dtype == film.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(film.float(), expected * (1 + scale.float()[..., None, None])
                               + shift.float()[..., None, None], rtol=tol, atol=tol)


def test_group_norm_round_trip_limit_is_the_one_measured():
    assert torch.Size((8, 256, 16, 16)).numel() == NCHW_ROUND_TRIP_MAX_NUMEL


@pytest.mark.skipif(not packed_conv_supports(torch.float32), reason="this PyTorch has no oneDNN packed convolution")
@pytest.mark.parametrize("in_ch,out_ch,kernel,stride", [(32, 32, 3, 1), (64, 32, 1, 1), (32, 32, 3, 2), (3, 32, 3, 1)])
def test_packed_conv_matches_conv2d(in_ch, out_ch, kernel, stride):
    plain = randomize_(torch.nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2))
    conv = fast_twin(plain, PackedConv2d)
    x = torch.randn(2, in_ch, 12, 10)
    with torch.inference_mode():
        out = conv(x)  # NCHW in: made channels-last
        assert is_channels_last(out)
        torch.testing.assert_close(out, plain(x), rtol=1e-4, atol=1e-4)
        assert conv(channels_last(x[:1])).shape[0] == 1  # another batch size: packed again
    assert set(conv.state_dict()) == {"weight", "bias"}


@pytest.mark.skipif(not packed_conv_supports(torch.bfloat16), reason="no bf16 packed convolution on this CPU")
def test_packed_conv_under_autocast_casts_as_autocast_does():
    plain = randomize_(torch.nn.Conv2d(32, 16, 3, padding=1))
    conv = fast_twin(plain, PackedConv2d)
    x = channels_last(torch.randn(2, 32, 8, 8))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = conv(x), plain(x)
    assert out.dtype == torch.bfloat16 and is_channels_last(out)
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("options", [{"padding": 1, "padding_mode": "reflect"}, {"padding": "same"}])
def test_conv_options_the_packed_op_cannot_do_take_the_plain_conv(options):
    plain = randomize_(torch.nn.Conv2d(8, 8, 3, **options))
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        torch.testing.assert_close(fast_twin(plain, PackedConv2d)(x), plain(x))


def test_conv_falls_back_where_the_packed_op_refuses_the_dtype(monkeypatch):
    """oneDNN refuses bf16 packing on a CPU without AVX-512: such a CPU must get the plain conv, not an error."""
    import unet.fast as fast
    monkeypatch.setattr(fast, "packed_conv_supports", lambda dtype: False)
    plain = randomize_(torch.nn.Conv2d(8, 8, 3, padding=1)).to(torch.bfloat16)
    x = torch.randn(2, 8, 6, 6).to(torch.bfloat16)
    conv = fast_twin(plain, PackedConv2d)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), plain(x))
    assert conv._packed == {}


def test_position_embedding_is_computed_once_per_size():
    from unet.blocks import PositionEmbedding
    from unet.fast import FastPositionEmbedding
    plain = randomize_(PositionEmbedding(channels=8))
    pe = fast_twin(plain, FastPositionEmbedding)
    x = torch.randn(2, 8, 4, 6)
    with torch.inference_mode():
        torch.testing.assert_close(pe(x), plain(x))
        pe(x)
        assert len(pe._cache) == 1
        assert pe(torch.randn(1, 8, 5, 5)).shape == (1, 8, 5, 5) and len(pe._cache) == 2


def test_shipped_pipeline_gives_the_golden_images_of_the_code_before_the_redesign():
    """The same seed gives the same images (fp32, 4 DPM++ steps) as the pipeline before the redesign
    (commit bec3710; tests/fixtures/make_golden.py), now through the sampler's optimized copy."""
    from safetensors.torch import load_file

    from diffusion.pipeline import TextToImagePipeline
    golden = load_file("tests/fixtures/golden_shipped.safetensors")["images"]
    pipe = TextToImagePipeline.from_pretrained("weights/default", dtype="fp32")
    result = pipe("a red circle above a blue square", num_images=2, steps=4, seed=0)
    images = torch.stack([torch.from_numpy(np.asarray(im).copy()) for im in result.images])
    assert images.shape == golden.shape
    assert (images.int() - golden.int()).abs().max() <= 2  # uint8 levels: rounding at the boundaries


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("self_rows", [slice(3, 6), None, slice(2, 4)])  # the prompt half; all; one of each half
def test_a_guided_batch_runs_its_text_free_layers_once_with_the_same_outputs_and_maps(name, self_rows):
    """[x; x] at [t; t] (classifier-free guidance) runs the layers before the first cross-attention once per
    image: the same outputs and maps as the plain model on the whole batch; other batches run in full."""
    plain = randomize_(UNet(CONFIGS[name]), std=0.1).eval()
    fast = optimize_for_inference(plain)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([10, 400, 900])
    context = torch.randn(6, 5, 32)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[:3, 2:] = False  # the negative prompts are shorter, as an empty one is
    runs = []
    for model in (plain, fast):
        store = AttentionStore(num_steps=1, rows=None, self_attention_rows=self_rows, context_layers=True)
        with torch.inference_mode(), model.record_attention(store):
            store.set_step(0)
            runs.append((model(torch.cat([x, x]), torch.cat([t, t]), context, mask), store))
    (want, want_maps), (got, got_maps) = runs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert list(got_maps.layers) == list(want_maps.layers)
    for layer in want_maps.layers:
        torch.testing.assert_close(got_maps.mean(layer), want_maps.mean(layer), rtol=1e-4, atol=1e-5, msg=layer)
    calls = []
    handle = fast.conv_in.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.inference_mode():
        fast(torch.cat([x, x]), torch.cat([t, t]), context, mask)
        fast(torch.cat([x, x.flip(0)]), torch.cat([t, t]), context, mask)  # not a guided pair
    handle.remove()
    assert calls == [3, 6]
