"""The U-Net: structure, shapes, gradients, save/load, errors."""

import json

import pytest
import torch

from tests.tiny import randomize_
from unet import UNet, UNetConfig
from unet.blocks import AttentionBlock, ContextRefiner, CrossAttentionBlock, PositionEmbedding, ResidualBlock


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return UNet(UNetConfig.preset("tiny"))


def inputs(batch=2, h=16, w=16, tokens=5, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 3, h, w, generator=g),
        torch.randint(0, 1000, (batch,), generator=g),
        torch.randn(batch, tokens, dim, generator=g),
    )


def test_forward_shape_and_non_square(tiny):
    for h, w in [(16, 16), (8, 24), (32, 16)]:
        x, t, ctx = inputs(h=h, w=w)
        assert tiny(x, t, ctx).shape == (2, 3, h, w)


def test_scalar_timestep_broadcasts(tiny):
    randomize_(tiny)
    x, _, ctx = inputs()
    torch.testing.assert_close(tiny(x, torch.tensor(7), ctx), tiny(x, torch.tensor([7, 7]), ctx))


def test_self_then_cross_after_every_residual_block_at_attention_levels():
    config = UNetConfig(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2, attention_resolution=8,
                        sample_size=16, num_heads=2, context_dim=16)
    unet = UNet(config)
    kinds = {ResidualBlock: "res", AttentionBlock: "self", CrossAttentionBlock: "cross"}
    order = [(name, kinds[type(m)]) for name, m in unet.named_modules() if type(m) in kinds]
    # Level 0 is 16×16 (> 8): residual blocks only. Levels 1, 2 (8×8, 4×4) and the middle: res, self, cross.
    for i, (name, kind) in enumerate(order):
        level_has_attention = not name.startswith(("down.0.", "up.0."))
        if kind == "res" and level_has_attention:
            assert [k for _, k in order[i : i + 3]] == ["res", "self", "cross"], name
        if kind == "res" and not level_has_attention:
            assert i + 1 == len(order) or order[i + 1][1] == "res", name
    names = [n for n, k in order if k != "res"]
    assert names[:2] == ["down.1.0.self_attn", "down.1.0.cross_attn"]
    assert "mid.0.self_attn" in names and "mid.1.cross_attn" in names and "up.2.2.cross_attn" in names
    assert len(names) == 2 * (2 * 2 + 2 + 3 * 2)  # 2 encoder levels × 2, middle 2, 2 decoder levels × 3
    # attention_layers lists blocks in the order forward() runs them: deepest decoder level first.
    run_order = list(unet.attention_layers)
    assert sorted(run_order) == sorted(names)
    levels = list(dict.fromkeys(".".join(n.split(".")[:2]) for n in run_order))
    assert levels == ["down.1", "down.2", "mid.0", "mid.1", "up.2", "up.1"]
    assert all(unet.attention_layers[n].name == n for n in names)


def test_gradients_reach_every_parameter(tiny):
    randomize_(tiny)  # zero-initialised projections would block gradients to layers before them
    x, t, ctx = inputs()
    ctx.requires_grad_(True)
    tiny(x, t, ctx, torch.ones(2, 5, dtype=torch.bool)).square().mean().backward()
    dead = [n for n, p in tiny.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    assert ctx.grad.abs().sum() > 0


def test_fresh_unet_outputs_zero_and_still_trains(tiny):
    x, t, ctx = inputs()
    out = tiny(x, t, ctx)
    assert out.abs().max() == 0  # zero-initialised conv_out
    out.square().mean().backward()
    assert tiny.conv_out.weight.grad is not None


def test_context_changes_output_once_trained(tiny):
    randomize_(tiny)
    x, t, ctx = inputs()
    assert not torch.allclose(tiny(x, t, ctx), tiny(x, t, ctx + 1.0))


def test_mask_invariants_through_the_whole_unet(tiny):
    randomize_(tiny)
    x, t, ctx = inputs(tokens=7)
    all_ones = torch.ones(2, 7, dtype=torch.bool)
    torch.testing.assert_close(tiny(x, t, ctx, all_ones), tiny(x, t, ctx), rtol=0, atol=0)
    mask = all_ones.clone()
    mask[:, 4:] = False
    torch.testing.assert_close(tiny(x, t, ctx, mask), tiny(x, t, ctx[:, :4]), rtol=1e-5, atol=1e-5)


def test_deterministic(tiny):
    randomize_(tiny)
    x, t, ctx = inputs()
    torch.testing.assert_close(tiny(x, t, ctx), tiny(x, t, ctx), rtol=0, atol=0)


def test_save_load_round_trip_is_bit_exact(tiny, tmp_path):
    randomize_(tiny)
    tiny.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in {".json", ".safetensors"}) == [
        "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["channel_mults"] == [1, 2] and config["context_dim"] == 32
    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.config == tiny.config and isinstance(loaded.config.channel_mults, tuple)
    assert not loaded.training
    for (k, a), (k2, b) in zip(tiny.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x, t, ctx = inputs()
    tiny.eval()
    assert torch.equal(tiny(x, t, ctx), loaded(x, t, ctx))


def test_load_refuses_mismatched_weights(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, message in [("attention_resolution", 16, "missing keys"), ("base_channels", 64, "size mismatch")]:
        # The weights no longer fit the config: they must not load as random layers.
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            UNet.from_pretrained(tmp_path)


def test_load_never_unpickles(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        UNet.from_pretrained(tmp_path)


def test_presets():
    assert UNetConfig.preset("cpu").sample_size == 32
    assert UNetConfig.preset("tiny", context_dim=64).context_dim == 64
    with pytest.raises(ValueError, match="tiny"):
        UNetConfig.preset("huge")


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda u: u(torch.randn(1, 3, 12, 16), torch.tensor([1]), torch.randn(1, 4, 32)), "12×16 is not divisible"),
        (lambda u: u(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.randn(1, 4, 32)), r"\(B, 3, H, W\)"),
        (lambda u: u(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]), torch.randn(2, 4, 32)), r"shape \(2,\)"),
        (lambda u: u(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.randn(1, 4, 64)), "context_dim=32"),
        (lambda u: u(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.randn(2, 4, 32)), "context must be"),
        (lambda u: u(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.randn(1, 4, 32), torch.ones(1, 4)), "bool"),
        (lambda u: u(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.randn(1, 4, 32),
                     torch.zeros(1, 4, dtype=torch.bool)), "at least one token"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    unet = UNet(UNetConfig.preset("tiny", channel_mults=(1, 2, 2, 2), attention_resolution=4))
    with pytest.raises(ValueError, match=message):
        call(unet)


def test_bad_config_raises_value_error():
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(base_channels=32, num_heads=5)
    with pytest.raises(ValueError, match="divisible by 32"):
        UNetConfig(base_channels=48)
    with pytest.raises(ValueError, match="sample_size 30"):
        UNetConfig(sample_size=30)


def test_entry_point_describes_the_model(capsys):
    from unet.__main__ import main

    main(["--preset", "tiny", "--height", "16", "--width", "24"])
    out = capsys.readouterr().out
    assert "down.1.0.cross_attn" in out and "8×12" in out and "M parameters" in out


def test_token_weights_of_one_change_nothing_and_others_do(tiny):
    randomize_(tiny)
    x, t, ctx = inputs(tokens=4)
    base = tiny(x, t, ctx)
    torch.testing.assert_close(tiny(x, t, ctx, token_weights=torch.ones(2, 4)), base, rtol=1e-5, atol=1e-6)
    weights = torch.ones(2, 4)
    weights[:, 2] = 3.0
    assert not torch.allclose(tiny(x, t, ctx, token_weights=weights), base, atol=1e-4)
    with pytest.raises(ValueError, match="token_weights"):
        tiny(x, t, ctx, token_weights=torch.ones(2, 5))


# -- the context refiner: bidirectional text layers before cross-attention ---------------------------
def test_fresh_context_refiner_is_the_identity(tiny):
    randomize_(tiny)
    twin = tiny.grow(context_layers=1)
    assert twin.config.context_layers == 1 and tiny.grow(context_layers=None) is tiny
    assert tiny.grow(context_layers=0) is tiny and twin.grow(context_layers=1) is twin
    with pytest.raises(ValueError, match="already has 1 context layers"):
        twin.grow(context_layers=2)  # trained layers are never dropped or reshaped
    x, t, ctx = inputs(tokens=6)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    torch.testing.assert_close(twin(x, t, ctx, mask), tiny(x, t, ctx, mask), rtol=0, atol=0)


def test_context_refiner_lets_early_tokens_see_later_ones_but_never_padding():
    refiner = randomize_(ContextRefiner(dim=32, num_layers=2, num_heads=2))
    ctx = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    base = refiner(ctx, mask)
    later = ctx.clone()
    # a later real token ("… to the left of …") changes what the first token carries
    later[:, 3] = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(refiner(later, mask)[:, 0], base[:, 0])
    padded = ctx.clone()
    padded[0, 4:] = torch.randn(2, 32) * 100  # padding of row 0: no real token of row 0 may change
    torch.testing.assert_close(refiner(padded, mask)[0, :4], base[0, :4], rtol=0, atol=0)
    torch.testing.assert_close(refiner(ctx, mask)[0, :4], refiner(ctx[:1, :4])[0], rtol=1e-5, atol=1e-5)


def test_context_refiner_trains_and_round_trips(tiny, tmp_path):
    randomize_(tiny)
    twin = tiny.grow(context_layers=2)
    x, t, ctx = inputs()
    twin(x, t, ctx).square().mean().backward()
    assert twin.context_refiner.layers[0].to_out.weight.grad.abs().sum() > 0  # zero-init, yet it learns
    randomize_(twin, seed_value=3)
    twin.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["context_layers"] == 2
    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.config.context_layers == 2
    torch.testing.assert_close(loaded(x, t, ctx), twin.eval()(x, t, ctx), rtol=0, atol=0)


def test_configs_saved_before_the_refiner_load_without_one(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["context_layers"], config["position_embedding"]  # as written before the fields existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.config.context_layers == 0 and loaded.context_refiner is None
    assert not loaded.config.position_embedding and all(layer.position is None for layer in loaded.down[-1])
    with pytest.raises(ValueError, match="context_layers"):
        UNetConfig(context_layers=-1)


# -- the position embedding: where each position is, before attention --------------------------------
def test_fresh_position_embedding_is_the_identity_and_grows_on_a_trained_unet(tiny):
    randomize_(tiny)
    grown = tiny.grow(position_embedding=True)
    assert grown.config.position_embedding and tiny.grow(position_embedding=False) is tiny
    assert grown.grow(position_embedding=True) is grown and grown.grow() is grown
    with pytest.raises(ValueError, match="trained position embedding"):
        grown.grow(position_embedding=False)
    both = tiny.grow(context_layers=1, position_embedding=True)
    assert both.config.context_layers == 1 and both.config.position_embedding
    x, t, ctx = inputs()
    for twin in (grown, both):
        torch.testing.assert_close(twin(x, t, ctx), tiny(x, t, ctx), rtol=0, atol=0)
    # only layers with attention get one: the 16×16 level of the tiny preset has none
    assert all(layer.position is None for layer in grown.down[0])
    assert all(layer.position is not None for layer in grown.down[1])


def test_position_features_tell_every_place_apart_at_any_size():
    pe = PositionEmbedding(channels=8)
    for H, W in ((8, 8), (16, 8), (5, 7)):
        f = pe.features(H, W, torch.device("cpu"))
        assert f.shape == (16, H, W)
        flat = f.flatten(1).T  # (H·W, 16)
        assert torch.cdist(flat, flat).add(torch.eye(H * W) * 10).min() > 0.1  # no two positions alike
    # the same fraction of the image reads the same at every resolution: cos(π·u) is u's first feature
    small, big = pe.features(4, 4, torch.device("cpu")), pe.features(8, 8, torch.device("cpu"))
    torch.testing.assert_close(small[4], torch.cos(torch.pi * (torch.arange(4) + 0.5) / 4)[:, None].expand(4, 4))
    assert big[4, 0, 0] > small[4, 0, 0] > 0  # nearer the top edge at 8 rows: the fraction is smaller


def test_position_embedding_trains_and_lets_attention_tell_left_from_right(tiny, tmp_path):
    """Once trained, the embedding marks left and right differently: the attention after it can tell them apart."""
    randomize_(tiny)
    grown = tiny.grow(position_embedding=True)
    x, t, ctx = inputs()
    grown(x, t, ctx).square().mean().backward()
    assert grown.down[1][0].position.proj.weight.grad.abs().sum() > 0  # zero-init, yet it learns
    randomize_(grown, seed_value=3)
    layer = grown.down[1][0]
    feats = torch.zeros(1, layer.position.proj.out_channels, 8, 8)
    out = layer.position(feats)
    assert not torch.allclose(out, out.flip(-1))  # left and right now differ
    grown.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["position_embedding"] is True
    loaded = UNet.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(x, t, ctx), grown.eval()(x, t, ctx), rtol=0, atol=0)


def test_model_files_are_plain_pytorch():
    """unet/blocks.py and unet/model.py train and sample through the same code: no grad-mode or memory-layout
    branches, no private PyTorch APIs, every forward at most ~30 lines (speed lives in unet/fast.py)."""
    import ast
    from pathlib import Path
    for path in (Path("unet/blocks.py"), Path("unet/model.py")):
        text = path.read_text()
        for banned in ("is_grad_enabled", "channels_last", "torch.ops", "._version", "is_contiguous"):
            assert banned not in text, f"{path}: {banned}"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name == "forward":
                assert node.end_lineno - node.lineno <= 32, f"{path}: forward at line {node.lineno}"


def test_forward_has_no_sampling_arguments(tiny):
    """Guidance batching lives in the sampler (diffusion/sampling.py), not in the model's signature."""
    import inspect
    assert list(inspect.signature(tiny.forward).parameters) == ["x", "t", "context", "context_mask", "token_weights"]


def test_shipped_unet_matches_the_golden_output_of_the_code_before_the_redesign():
    """The shipped weights load strictly and give what the pre-redesign U-Net gave (commit bec3710, its
    NCHW path in fp32; tests/fixtures/make_golden.py) on a fixed input."""
    from safetensors.torch import load_file
    golden = load_file("tests/fixtures/golden_shipped.safetensors")
    unet = UNet.from_pretrained("weights/default/unet")
    with torch.no_grad():
        eps = unet(golden["x"], golden["t"], golden["context"], golden["mask"])
    torch.testing.assert_close(eps, golden["eps"], rtol=1e-4, atol=1e-4)


def test_python_m_unet_describes_the_layers_and_times_a_guided_step(capsys):
    """`python -m unet`: every attention layer with its recorded map, and a guided step as sampling runs it."""
    from unet.__main__ import main
    main(["--preset", "tiny", "--tokens", "5"])
    out = capsys.readouterr().out
    unet = UNet(UNetConfig.preset("tiny"))
    for name in unet.attention_layers:
        assert name in out
    assert "cross" in out and ", 5)" in out  # a cross-attention map over the 5 tokens was recorded
    assert "one guided step of one image at" in out and " ms on " in out
