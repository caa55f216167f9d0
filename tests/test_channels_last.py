"""The CPU sampling path (unet/channels_last.py) computes what the NCHW path computes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import randomize_
from unet import AttentionStore, UNet, UNetConfig
from unet.channels_last import Conv2d, GroupNorm, group_norm_channels_last, is_channels_last, packed_conv_supports


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (3, 32, 16, 16), (1, 128, 4, 6), (2, 64, 32, 32)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_group_norm_on_channels_last_matches_pytorch(shape, dtype, tol):
    norm = randomize_(GroupNorm(32, shape[1])).to(dtype)
    x = (torch.randn(shape) * 3 + 1.5).to(dtype)  # an offset mean: E[x²] − mean² must not lose it
    expected = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)
    out = norm(channels_last(x))
    assert is_channels_last(out) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_group_norm_takes_the_nchw_kernel_for_small_bf16_inputs(monkeypatch, dtype):
    """Below 1,024 positions: bf16 inputs of up to NCHW_ROUND_TRIP_MAX_NUMEL elements go through PyTorch's
    NCHW kernel (a copy each way; with FiLM the batch folded into the channels, FiLM in the affine), larger
    ones and fp32 through the sums; all give the norm."""
    import unet.channels_last as cl
    sums = []
    monkeypatch.setattr(cl, "group_norm_channels_last",
                        lambda *a, **k: sums.append(a[0].shape) or group_norm_channels_last(*a, **k))
    small, large = (8, 256, 16, 16), (8, 512, 16, 16)  # the limit and twice that
    assert torch.Size(small).numel() == cl.NCHW_ROUND_TRIP_MAX_NUMEL
    for shape in (small, large):
        norm = randomize_(GroupNorm(32, shape[1])).to(dtype)
        x = channels_last((torch.randn(shape) * 3 + 1.5).to(dtype))
        scale, shift = torch.randn(2, shape[0], shape[1], dtype=dtype) * 0.1
        expected = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)
        with torch.inference_mode():
            out, film = norm(x), norm.modulated(x, scale, shift)
        assert is_channels_last(out) and is_channels_last(film) and out.dtype == film.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
        torch.testing.assert_close(film.float(), expected * (1 + scale.float()[..., None, None])
                                   + shift.float()[..., None, None], rtol=tol, atol=tol)
    # fp32 always, bf16 only when large
    assert sums == ([small, small] if dtype == torch.float32 else []) + [large, large]


def test_group_norm_channels_last_gradients_match():
    norm = randomize_(GroupNorm(8, 32))
    x = torch.randn(2, 32, 8, 8)
    grads = []
    for inp in (x.clone(), channels_last(x)):
        inp.requires_grad_(True)
        norm.zero_grad()
        (norm(inp) * torch.linspace(-1, 1, 64).view(8, 8)).sum().backward()
        grads.append((inp.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not packed_conv_supports(torch.float32), reason="this PyTorch has no oneDNN packed convolution")
@pytest.mark.parametrize("in_ch,out_ch,kernel,stride", [(32, 32, 3, 1), (64, 32, 1, 1), (32, 32, 3, 2), (3, 32, 3, 1)])
def test_packed_conv_matches_conv2d_and_follows_weight_changes(in_ch, out_ch, kernel, stride):
    conv = randomize_(Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2))
    x = channels_last(torch.randn(2, in_ch, 12, 10))
    with torch.inference_mode():
        out = conv(x)
        assert is_channels_last(out)
        torch.testing.assert_close(out, F.conv2d(x.contiguous(), conv.weight, conv.bias, stride, kernel // 2),
                                   rtol=1e-4, atol=1e-4)
        assert conv(x[:1].contiguous(memory_format=torch.channels_last)).shape[0] == 1  # another batch size
    with torch.no_grad():
        conv.weight.mul_(-2)  # an optimizer step or load_state_dict: the packed copy must not go stale
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), -2 * out + 3 * conv.bias[:, None, None], rtol=1e-4, atol=1e-4)
    copy.deepcopy(conv)  # the packed weight (an opaque oneDNN tensor) is not part of the module
    assert set(conv.state_dict()) == {"weight", "bias"}


@pytest.mark.skipif(not packed_conv_supports(torch.bfloat16), reason="no bf16 packed convolution on this CPU")
def test_packed_conv_under_autocast_casts_as_autocast_does_and_follows_bias_changes(monkeypatch):
    """bf16 autocast sampling takes the packed op too: input, weight and bias in bf16, as autocast's
    F.conv2d computes it, the bf16 copies made once per weight and bias version."""
    from unet import channels_last as cl
    conv = randomize_(Conv2d(32, 16, 3, padding=1))
    x = channels_last(torch.randn(2, 32, 8, 8))
    packed_calls = []
    monkeypatch.setattr(cl, "packed_conv2d", lambda c, inp, _f=cl.packed_conv2d: packed_calls.append(inp.dtype)
                        or _f(c, inp))

    def expected():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.conv2d(x.contiguous(), conv.weight, conv.bias, padding=1)

    for _ in range(2):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16 and is_channels_last(out)
        torch.testing.assert_close(out.float(), expected().float(), rtol=0.02, atol=0.02)
        with torch.no_grad():
            conv.bias.add_(1.0)  # a new bias version: the cached bf16 bias must follow
    assert packed_calls == [torch.bfloat16] * 2


def tiny_unet(**overrides) -> UNet:
    config = UNetConfig.preset("tiny", position_embedding=True, context_layers=1, **overrides)
    return randomize_(UNet(config), std=0.1).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_unet_channels_last_sampling_matches_nchw(dtype, tol):
    unet = tiny_unet().to(dtype)
    x = torch.randn(3, 3, 16, 24).to(dtype)
    t = torch.tensor([10, 400, 900])
    context = torch.randn(3, 5, 32).to(dtype)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    weights = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0]] * 3).to(dtype)
    outs, maps = [], []
    for fast in (False, True):
        unet.cpu_channels_last = fast
        store = AttentionStore(num_steps=1)
        with torch.inference_mode(), unet.record_attention(store):
            store.set_step(0)
            outs.append(unet(x, t, context, mask, weights))
        maps.append(store)
    assert outs[1].is_contiguous()  # callers get NCHW back
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=tol, atol=tol)
    for name in unet.attention_layers:
        torch.testing.assert_close(maps[1].mean(name).float(), maps[0].mean(name).float(), rtol=tol, atol=tol)


def test_unet_keeps_nchw_under_autograd():
    """Training and layout guidance differentiate through the U-Net: the NCHW path, gradients intact."""
    unet = tiny_unet()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = unet(x, torch.tensor([10, 500]), torch.randn(2, 4, 32))
    out.square().mean().backward()
    assert out.is_contiguous() and x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_cache_text_reuses_the_text_side_only_for_the_same_tensors():
    unet = tiny_unet()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    context, other = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    weights = torch.tensor([[1.0, 3.0, 1.0, 1.0]] * 2)
    with torch.inference_mode():
        expected = [unet(x, t, c, mask, weights) for c in (context, other, context)]
        with unet.cache_text():
            got = [unet(x, t, c, mask, weights) for c in (context, context, other, context)]
            cached = unet._text_cache
            assert cached["inputs"][0] is context and "context" in cached
            assert {k[0] for k in cached if isinstance(k, tuple)} == {
                n for n in unet.attention_layers if n.endswith("cross_attn")}
            assert torch.equal(unet(x, t, context, None, weights), unet(x, t, context, None, weights))
            torch.testing.assert_close(unet(x, t, context, None, weights),
                                       unet(x, t, context.clone(), None, weights))  # new object: recomputed
        assert unet._text_cache is None  # the cache ends with the block
    for a, b in zip([expected[0], expected[0], expected[1], expected[2]], got, strict=True):
        # Cached, cross-attention takes the folded path (the same function, another summation order).
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with unet.cache_text():  # under autograd (layout guidance, training) nothing is cached
        unet(x, t, context, mask).sum().backward()
        assert unet._text_cache == {}


class MapsOf:
    """A recorder that keeps the last map handed to it."""

    def rows(self, batch_size, kind):
        return slice(0, batch_size)

    def record(self, name, kind, size, probs):
        self.probs = probs


@pytest.mark.parametrize("dtype,tol,map_tol", [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, 0.05, 0.02)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("text_tokens,path", [(6, "folded"), (6, "channel major"), (40, "channel major"),
                                              (6, "fused"), (40, "fused")])
def test_cross_attention_paths_compute_the_same_outputs_and_maps(monkeypatch, layout, text_tokens, path, dtype, tol,
                                                                 map_tol):
    """Every path CrossAttentionBlock can take, in each layout and dtype it takes it in, against the plain
    NCHW math in fp32. The folded path runs with the text cached (as the U-Net samples), twice: computing
    the folded text, then reusing it."""
    from unet import attention, blocks
    block = randomize_(blocks.CrossAttentionBlock(64, 32, num_heads=4)).eval()
    x, context = torch.randn(2, 64, 8, 12), torch.randn(2, text_tokens, 32)
    mask = torch.ones(2, text_tokens, dtype=torch.bool)
    mask[0, 4:] = False
    weights = torch.ones(2, text_tokens)
    weights[:, 1] = 2.5
    # The plain math: normalise, project, softmax over the kept tokens, weighted values, project, residual.
    h, d = 4, 16
    q = F.conv2d(F.group_norm(x, 32, block.norm.weight, block.norm.bias, block.norm.eps), block.to_q.weight,
                 block.to_q.bias).flatten(2).view(2, h, d, 96).transpose(-1, -2)  # (B, h, N, d)
    k = block.to_k(context).view(2, text_tokens, h, d).transpose(1, 2)
    v = (block.to_v(context) * weights[:, :, None]).view(2, text_tokens, h, d).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / d**0.5).masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    expected = x + F.conv2d((probs @ v).transpose(-1, -2).reshape(2, 64, 8, 12), block.to_out.weight, block.to_out.bias)
    expected_maps = probs * weights[:, None, None, :]

    taken = []
    for name in ("_forward_folded", "_forward_channel_major", "_forward_fused"):
        method = getattr(blocks.CrossAttentionBlock, name)
        monkeypatch.setattr(blocks.CrossAttentionBlock, name,
                            lambda self, *a, _m=method, _n=name: taken.append(_n) or _m(self, *a))
    if path == "fused":
        monkeypatch.setattr(attention, "EXPLICIT_MAX_PROBS", 0)
    block = block.to(dtype)
    block.recorder = MapsOf()
    inp = (channels_last(x) if layout == "channels_last" else x).to(dtype)
    cache = {} if path == "folded" else None
    with torch.inference_mode():
        outs = [block(inp, context.to(dtype), mask, weights.to(dtype), text_cache=cache)
                for _ in range(2 if path == "folded" else 1)]
    assert taken == ["_forward_" + path.replace(" ", "_")] * len(outs)
    if path == "folded":
        assert list(cache) == [(block.name, "folded")]  # computed once, then reused
    for out in outs:
        assert is_channels_last(out) == (layout == "channels_last") and out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(block.recorder.probs.float(), expected_maps, rtol=map_tol, atol=map_tol)


def test_cross_attention_folds_only_a_cached_short_text():
    """The folded path needs the text cached (the fold is paid once per sampling run) and a text short
    enough that its h·L·C multiply-adds a position stay within FOLDED_MAX_FLOPS_RATIO of C·(C + L)."""
    from unet import blocks
    block = blocks.CrossAttentionBlock(64, 32, num_heads=4).eval()
    taken = []
    block._forward_folded = lambda *a: taken.append("folded")
    block._forward_channel_major = lambda *a: taken.append("channel major")
    x = torch.randn(2, 64, 8, 8)
    longest = int(blocks.FOLDED_MAX_FLOPS_RATIO * 64 / (4 - blocks.FOLDED_MAX_FLOPS_RATIO))  # 4·L ≤ 1.5·(64 + L)
    with torch.inference_mode():
        for tokens, cache in ((6, {}), (longest, {}), (longest + 1, {}), (6, None)):
            block(x, torch.randn(2, tokens, 32), text_cache=cache)
    assert taken == ["folded", "folded", "channel major", "channel major"]


def test_cross_attention_channel_major_path_trains():
    """Under autograd (training, layout guidance) the channel-major path gives the seed's gradients."""
    from tests import seed_reference as seed
    from unet.blocks import CrossAttentionBlock
    ref = randomize_(seed.NaiveCrossAttentionBlock(64, 32, 4))
    ours = CrossAttentionBlock(64, 32, num_heads=4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, context = torch.randn(2, 64, 8, 8), torch.randn(2, 5, 32)
    grads = []
    for block in (ours, ref):
        inp = x.clone().requires_grad_(True)
        (block(inp, context) * torch.linspace(-1, 1, 64).view(8, 8)).sum().backward()
        grads.append([inp.grad] + [p.grad for _, p in sorted(block.named_parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
@pytest.mark.parametrize("size", [(6, 10), (32, 32)])  # below and at PyTorch's fast channels-last kernel
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_modulated_group_norm_is_norm_then_film(layout, size, dtype, tol):
    """Every path of GroupNorm.modulated (sums with FiLM, the batch folded into the channels with FiLM in its
    affine, PyTorch's channels-last kernel then FiLM) against the norm then FiLM in fp32; the same layout out."""
    norm = randomize_(GroupNorm(8, 32))
    x = torch.randn(3, 32, *size) * 2 + 0.5
    scale, shift = torch.randn(3, 32), torch.randn(3, 32)
    expected = F.group_norm(x, 8, norm.weight, norm.bias, norm.eps) * (1 + scale[:, :, None, None]) \
        + shift[:, :, None, None]
    x = channels_last(x) if layout == "channels_last" else x
    with torch.inference_mode():
        out = norm.to(dtype).modulated(x.to(dtype), scale.to(dtype), shift.to(dtype))
    assert out.dtype == dtype and is_channels_last(out) == (layout == "channels_last")
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_modulated_group_norm_gradients_match_norm_then_film():
    """Under autograd (training) the folded FiLM gives the gradients of the norm then FiLM."""
    grads = []
    for folded in (True, False):
        norm = randomize_(GroupNorm(8, 32))
        torch.manual_seed(0)
        x, scale, shift = (torch.randn(*s, requires_grad=True) for s in ((3, 32, 6, 10), (3, 32), (3, 32)))
        out = norm.modulated(x, scale, shift) if folded else \
            norm(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        (out * torch.linspace(-1, 1, 60).view(6, 10)).sum().backward()
        grads.append([x.grad, scale.grad, shift.grad, norm.weight.grad, norm.bias.grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_stacked_time_mlps_follow_weight_changes():
    """Sampling runs all residual blocks' time MLPs as one matmul; an in-place weight change must show."""
    unet = tiny_unet()
    x, t, context = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 4, 32)
    for _ in range(2):
        with torch.inference_mode():
            sampled = unet(x, t, context)
        trained = unet(x, t, context).detach()  # under autograd: each block's own time MLP, NCHW
        torch.testing.assert_close(sampled, trained, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            unet.down[0][0].res.time_mlp[1].weight.mul_(3)  # an optimizer step between two previews


@pytest.mark.parametrize("options", [{"padding": 1, "padding_mode": "reflect"}, {"padding": "same"}])
def test_conv_options_the_packed_op_cannot_do_take_the_plain_conv(options):
    conv = randomize_(Conv2d(8, 8, 3, **options))
    x = channels_last(torch.randn(2, 8, 6, 6))
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), torch.nn.Conv2d.forward(conv, x))


def test_conv_falls_back_where_the_packed_op_refuses_the_dtype(monkeypatch):
    """oneDNN refuses bf16 packing on a CPU without AVX-512: such a CPU must get the plain conv, not an error."""
    import unet.channels_last as cl

    def refuse(*args):
        raise AssertionError("the packed path ran for a dtype the probe refused")

    monkeypatch.setattr(cl, "packed_conv_supports", lambda dtype: False)
    monkeypatch.setattr(cl, "packed_conv2d", refuse)
    conv = randomize_(Conv2d(8, 8, 3, padding=1)).to(torch.bfloat16)
    x = channels_last(torch.randn(2, 8, 6, 6)).to(torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), torch.nn.Conv2d.forward(conv, x))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_upsample_phase_conv_is_nearest_then_conv(layout, dtype, tol):
    """Without autograd Upsample runs as one 2×2 conv per output phase, interleaved: the same function as
    nearest-neighbour then the 3×3 conv, in x's layout; it follows weight changes and adds no state."""
    from unet.blocks import Upsample
    up = randomize_(Upsample(16))
    x = torch.randn(2, 16, 5, 7)

    def expected():
        return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight.float(),
                        up.conv.bias.float(), padding=1)

    up = up.to(dtype)
    inp = (channels_last(x) if layout == "channels_last" else x).to(dtype)
    with torch.inference_mode():
        out = up(inp)
    assert out.shape == (2, 16, 10, 14) and out.dtype == dtype and is_channels_last(out) == (layout == "channels_last")
    torch.testing.assert_close(out.float(), expected().detach(), rtol=tol, atol=tol)
    with torch.no_grad():
        up.conv.weight.mul_(-1)  # an optimizer step or load_state_dict: the phase conv must follow
        out = up(inp)
    torch.testing.assert_close(out.float(), expected().detach(), rtol=tol, atol=tol)
    assert set(up.state_dict()) == {"conv.weight", "conv.bias"}
    copy.deepcopy(up)


def test_upsample_under_autograd_matches_the_plain_form():
    """Under autograd the phase weights are derived in the graph: the output and the gradients of x, the
    weight and the bias are those of nearest-neighbour then the 3×3 conv; under bf16 autocast and with bf16
    weights (layout guidance in the app) within twice the plain form's own rounding error (against fp32)."""
    from unet.blocks import Upsample
    torch.manual_seed(0)
    up = randomize_(Upsample(8))
    x = torch.randn(2, 8, 4, 6)
    g = torch.randn(2, 8, 8, 12)

    def run(fn, mode="fp32"):
        module = copy.deepcopy(up).to(torch.bfloat16) if mode == "bf16 weights" else up
        inp = x.to(module.conv.weight.dtype).detach().requires_grad_(True)
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            out = fn(module, inp)
        (out.float() * g).sum().backward()
        return [t.float() for t in (out, inp.grad, module.conv.weight.grad, module.conv.bias.grad)]

    def phases(module, inp):
        return module(inp)

    def plain(module, inp):
        return module.conv(F.interpolate(inp, scale_factor=2.0, mode="nearest"))

    want = run(plain)
    assert want[0].shape == (2, 8, 8, 12)
    for a, b in zip(run(phases), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for mode in ("autocast", "bf16 weights"):
        for a, b, c in zip(run(phases, mode), run(plain, mode), want, strict=True):
            assert (a - c).abs().max() <= 2 * (b - c).abs().max() + 1e-3, mode
