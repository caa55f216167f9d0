"""Blocks: seed fidelity, kernel equivalence, mask invariants, errors."""

import pytest
import torch

from benchmarks import seed_blocks as seed
from tests.tiny import randomize_
from unet import attention
from unet.blocks import AttentionBlock, CrossAttentionBlock, ResidualBlock, timestep_embedding


@pytest.mark.parametrize("in_ch,out_ch,t_dim", [(32, 32, None), (32, 64, 16), (64, 32, 16)])
def test_residual_block_matches_seed(in_ch, out_ch, t_dim):
    ref = randomize_(seed.ResidualBlock(in_ch, out_ch, t_dim))
    ours = ResidualBlock(in_ch, out_ch, t_dim)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, in_ch, 8, 6)
    t_emb = torch.randn(2, t_dim) if t_dim else None
    torch.testing.assert_close(ours(x, t_emb), ref(x, t_emb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_ch,out_ch", [(32, 64), (64, 32)])
def test_residual_block_gradients_match_seed(in_ch, out_ch):
    """Under autograd a projected skip adds onto conv2's output in one batched matmul: the same output and
    the same gradients for x and every parameter (both biases included) as the seed's 1×1 conv plus add."""
    ref = randomize_(seed.ResidualBlock(in_ch, out_ch, 16))
    ours = ResidualBlock(in_ch, out_ch, 16)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t_emb, g = torch.randn(2, in_ch, 8, 6), torch.randn(2, 16), torch.randn(2, out_ch, 8, 6)
    grads = []
    for block in (ours, ref):
        inp = x.clone().requires_grad_(True)
        (block(inp, t_emb) * g).sum().backward()
        grads.append([inp.grad] + [p.grad for _, p in sorted(block.named_parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(4, 4), (8, 8), (16, 16), (6, 10), (32, 40)])
@pytest.mark.parametrize("heads", [1, 4, 8])
def test_attention_block_matches_seed(size, heads):
    ref = randomize_(seed.AttentionBlock(64, heads))
    ours = AttentionBlock(64, heads)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 64, *size)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_seed_parameter_names_and_shapes_are_kept():
    for ref, ours in [
        (seed.ResidualBlock(32, 64, 128), ResidualBlock(32, 64, 128)),
        (seed.AttentionBlock(96, 8), AttentionBlock(96, 8)),
    ]:
        assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("size", [(4, 4), (16, 16), (8, 12)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_cross_attention_matches_naive_reference(size, with_mask):
    ref = randomize_(seed.NaiveCrossAttentionBlock(64, 48, 4))
    ours = CrossAttentionBlock(64, 48, 4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(3, 64, *size), torch.randn(3, 7, 48)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool) if with_mask else None
    torch.testing.assert_close(ours(x, ctx, mask), ref(x, ctx, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("N,L", [(16, 5), (256, 77), (1024, 8), (64, 64), (1024, 1024)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_and_explicit_kernels_agree(monkeypatch, N, L, with_mask):
    q, k, v = torch.randn(2, 4, N, 16), torch.randn(2, 4, L, 16), torch.randn(2, 4, L, 16)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, L // 2 :] = False
    mask = mask if with_mask else None
    outs = []
    for max_keys in (10**9, -1):  # force explicit, then force SDPA
        monkeypatch.setattr(attention, "EXPLICIT_MAX_KEYS", max_keys)
        monkeypatch.setattr(attention, "EXPLICIT_MAX_PROBS", 10**12)
        outs.append(attention.attention(q, k, v, mask)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "B,N,L,fused",
    [(2, 256, 8, False), (2, 64, 77, False), (8, 4096, 77, True), (2, 1024, 1024, True), (2, 256, 256, True)],
)
def test_kernel_choice_follows_shape(monkeypatch, B, N, L, fused):
    calls = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    attention.attention(torch.randn(B, 4, N, 8), torch.randn(B, 4, L, 8), torch.randn(B, 4, L, 8))
    assert bool(calls) == fused


def test_all_ones_mask_equals_no_mask():
    block = randomize_(CrossAttentionBlock(32, 16, 2))
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 6, 16)
    torch.testing.assert_close(block(x, ctx, torch.ones(2, 6, dtype=torch.bool)), block(x, ctx), rtol=0, atol=0)


@pytest.mark.parametrize("N", [16, 1024])  # explicit and SDPA kernels
def test_masking_trailing_tokens_equals_dropping_them(N):
    block = randomize_(CrossAttentionBlock(32, 16, 2))
    side = int(N**0.5)
    x, ctx = torch.randn(2, 32, side, side), torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 5:] = False
    # Garbage in the masked positions must not leak through.
    ctx_garbage = ctx.clone()
    ctx_garbage[:, 5:] = 1e4
    torch.testing.assert_close(block(x, ctx_garbage, mask), block(x, ctx[:, :5]), rtol=1e-5, atol=1e-5)


def test_fresh_blocks_are_identity_on_the_residual_path():
    # Zero-initialised output projections: a new text path changes nothing until it is trained.
    x, ctx = torch.randn(2, 32, 8, 8), torch.randn(2, 5, 16)
    torch.testing.assert_close(AttentionBlock(32, 4)(x), x)
    torch.testing.assert_close(CrossAttentionBlock(32, 16, 4)(x, ctx), x)
    torch.testing.assert_close(ResidualBlock(32, 32, 8)(x, torch.randn(2, 8)), x)


@pytest.mark.parametrize(
    "make,numbers",
    [
        (lambda: AttentionBlock(64, 7), ["64", "7"]),
        (lambda: AttentionBlock(48, 4), ["48", "32"]),  # GroupNorm(32) cannot split 48 channels
        (lambda: ResidualBlock(40, 64), ["40", "32"]),
        (lambda: ResidualBlock(32, 50, 8), ["50", "32"]),
        (lambda: CrossAttentionBlock(64, 16, 5), ["64", "5"]),
    ],
)
def test_bad_sizes_raise_value_error_naming_the_numbers(make, numbers):
    with pytest.raises(ValueError) as err:
        make()
    for n in numbers:
        assert n in str(err.value)


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 32)
    assert emb.shape == (3, 32)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(16), torch.zeros(16)]))  # cos 0 = 1, sin 0 = 0
    assert not torch.allclose(emb[1], emb[2])
    torch.testing.assert_close(timestep_embedding(torch.tensor([0.5]), 32)[0, 0], torch.cos(torch.tensor(0.5)))


@pytest.mark.parametrize("N,L", [(64, 64), (256, 256), (256, 7)])  # explicit, SDPA, a text
@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_attention_on_a_cpu_runs_in_fp32_by_default(N, L, autocast):
    """On a CPU, the default processor computes bf16 attention in fp32 (faster under autograd there), even
    inside autocast, which would otherwise cast the operands back; the output and gradients come back in
    bf16. The sampling path's processor (upcast=False) keeps bf16."""
    layer = attention.AttentionLayer(4)
    q, k, v = (torch.randn(2, 4, n, 16).bfloat16().requires_grad_(True) for n in (N, L, L))
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, L // 2:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer.attend(q, k, v, mask)
    expected = attention.attention(q.detach().float(), k.detach().float(), v.detach().float(), mask)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16(), rtol=0, atol=0)
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
    layer.processor = attention.AttentionProcessor(upcast=False)
    with torch.no_grad():
        assert not torch.equal(layer.attend(q, k, v, mask), expected.bfloat16())


def test_every_attention_layer_calls_its_processor_once_per_forward():
    """The seam: self-attention, cross-attention and the context layers all go through their processor,
    which sees the layer, its kind and the queries' layout (diffusers' custom-processor test)."""
    from unet import UNet, UNetConfig

    class Counting(attention.AttentionProcessor):
        def __call__(self, layer, q, k, v, mask, weights, size):
            calls.append((layer.name, layer.kind, size))
            return super().__call__(layer, q, k, v, mask, weights, size)

    calls = []
    unet = UNet(UNetConfig.preset("tiny", context_layers=2)).eval()
    unet.set_attention_processor(Counting())
    with torch.no_grad():
        unet(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.randn(2, 5, 32))
    assert [name for name, _, _ in calls] == list(unet.attention_layers)
    kinds = {kind for _, kind, _ in calls}
    assert kinds == {"self", "cross", "context"}
    assert ("context_refiner.layers.1", "context", (1, 5)) in calls and ("mid.0.cross_attn", "cross", (8, 8)) in calls
