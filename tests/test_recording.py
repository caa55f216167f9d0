"""Attention recording: keyed by (layer, step bin), constant memory, never changes the output."""

import pytest
import torch

from tests.test_unet import inputs
from tests.tiny import randomize_
from unet import AttentionStore, UNet, UNetConfig
from unet.attention import attention, attention_probs
from unet.fast import optimize_for_inference


@pytest.fixture
def unet():
    torch.manual_seed(0)
    config = UNetConfig(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolution=8,
                        sample_size=16, num_heads=2, context_dim=32)
    return randomize_(UNet(config).eval())


def run_steps(unet, store, steps, x, ctx, mask=None, grad=False):
    outs = []
    with torch.set_grad_enabled(grad), unet.record_attention(store):
        for step in range(steps):
            store.set_step(step)
            outs.append(unet(x, torch.full((x.shape[0],), 999 - step * 10), ctx, mask))
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recording_never_changes_the_output(unet, dtype):
    # the explicit kernel shares its probabilities with the recorder, SDPA's are computed on the side
    unet = unet.to(dtype)
    x, _, ctx = (t.to(dtype) for t in inputs(tokens=6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    for model, grad in ((unet, False), (unet, True), (optimize_for_inference(unet), False)):  # + the CPU fast path
        with torch.set_grad_enabled(grad):
            plain = [model(x, torch.full((2,), 999 - s * 10), ctx, mask) for s in range(3)]
        recorded = run_steps(model, AttentionStore(num_steps=3, context_layers=True), 3, x, ctx, mask, grad=grad)
        for a, b in zip(plain, recorded, strict=True):
            assert torch.equal(a, b)


def test_one_cross_map_per_cross_layer_per_bin(unet):
    x, _, ctx = inputs(tokens=6)
    store = AttentionStore(num_steps=8, num_bins=4)
    run_steps(unet, store, 8, x, ctx)
    cross = store.layer_names("cross")
    assert cross == [n for n in unet.attention_layers if n.endswith("cross_attn")]
    for name in cross:
        assert store.recorded_bins(name) == [0, 1, 2, 3]
        assert all(store._counts[(name, b)] == 2 for b in range(4))  # 8 steps / 4 bins
    assert list(store.bin_steps(1)) == [2, 3]


def test_cross_maps_rows_sum_to_one_over_real_tokens(unet):
    x, _, ctx = inputs(tokens=8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 5:] = False  # 3 padding tokens
    store = AttentionStore(num_steps=2, num_tokens=5)
    run_steps(unet, store, 2, x, ctx, mask)
    for name in store.layer_names("cross"):
        info = store.layers[name]
        maps = store.mean(name)
        assert maps.shape == (2, info.size[0] * info.size[1], 5)  # cut to the real tokens
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:2]))
        heads = store.head_mean(name)
        assert heads.shape == (2, info.heads, maps.shape[1], 5)
        torch.testing.assert_close(heads.mean(1), maps)


def test_self_attention_recorded_only_at_low_resolution(unet):
    x, _, ctx = inputs(h=16, w=32)
    store = AttentionStore(num_steps=1, self_attention_max_positions=32)
    run_steps(unet, store, 1, x, ctx)
    sizes = {store.layers[n].size for n in store.layer_names("self")}
    assert sizes == {(4, 8)}  # the 8×16 layers have 128 > 32 positions: skipped; (H, W) kept non-square
    for name in store.layer_names("self"):
        m = store.mean(name)
        assert m.shape == (2, 32, 32)
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 32))
    assert {store.layers[n].size for n in store.layer_names("cross")} == {(8, 16), (4, 8)}


def test_self_attention_at_chosen_steps_of_each_bin(unet):
    # 10 steps in 4 bins (3, 2, 3, 2 steps): self-attention at each bin's middle step, cross at every step.
    x, _, ctx = inputs(tokens=5)
    store = AttentionStore(num_steps=10, num_bins=4, self_attention_per_bin=1)
    assert [list(store.bin_steps(b)) for b in range(4)] == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    assert [store.self_attention_steps(b) for b in range(4)] == [[1], [4], [6], [9]]
    run_steps(unet, store, 10, x, ctx)
    self_name, cross_name = store.layer_names("self")[0], store.layer_names("cross")[0]
    assert [store._counts[(self_name, b)] for b in range(4)] == [1, 1, 1, 1]
    assert [store._counts[(cross_name, b)] for b in range(4)] == [3, 2, 3, 2]
    # The bin's map is exactly the map of its chosen step.
    only = AttentionStore(num_steps=10, num_bins=4)
    with torch.no_grad(), unet.record_attention(only):
        only.set_step(6)
        unet(x, torch.full((2,), 999 - 6 * 10), ctx)
    torch.testing.assert_close(store.mean(self_name, bins=[2]), only.mean(self_name, bins=[2]))
    # More steps per bin than the bin has: every step; None: every step.
    assert AttentionStore(num_steps=10, num_bins=4, self_attention_per_bin=3).self_attention_steps(1) == [3, 4]
    assert AttentionStore(num_steps=10, num_bins=4, self_attention_per_bin=2).self_attention_steps(0) == [0, 2]
    assert AttentionStore(num_steps=10, num_bins=4).self_attention_steps(0) == [0, 1, 2]
    with pytest.raises(ValueError, match="self_attention_per_bin"):
        AttentionStore(num_steps=10, self_attention_per_bin=0)


def test_only_chosen_rows_are_recorded(unet):
    # A guided batch: unconditional half first, conditional half second; record the conditional half.
    x, _, ctx = inputs(batch=4, tokens=4)
    store = AttentionStore(num_steps=1, rows=slice(2, 4))
    run_steps(unet, store, 1, x, ctx)
    name = store.layer_names("cross")[0]
    assert store.mean(name).shape[0] == 2
    # The same maps as recording a batch of only those rows.
    alone = AttentionStore(num_steps=1)
    run_steps(unet, alone, 1, x[2:], ctx[2:])
    torch.testing.assert_close(store.mean(name), alone.mean(name), rtol=1e-5, atol=1e-6)


def test_memory_is_flat_in_the_number_of_steps(unet):
    x, _, ctx = inputs(tokens=5)
    sizes = []
    for steps in (4, 12):
        store = AttentionStore(num_steps=steps, num_bins=4)
        run_steps(unet, store, steps, x, ctx)
        sizes.append(store.nbytes())
    assert sizes[0] == sizes[1] > 0


def test_step_must_be_set_by_the_caller(unet):
    x, t, ctx = inputs()
    store = AttentionStore(num_steps=2)
    with unet.record_attention(store), pytest.raises(RuntimeError, match="set_step"):
        unet(x, t, ctx)
    with pytest.raises(ValueError, match="outside 0..1"):
        store.set_step(2)


def test_recorder_always_detaches(unet):
    with pytest.raises(ZeroDivisionError), unet.record_attention(AttentionStore(num_steps=1)):
        raise ZeroDivisionError
    assert all(block.processor.recorder is None for block in unet.attention_layers.values())


def test_steps_land_in_their_bins(unet):
    # Maps at different steps differ, so a per-bin mean must equal the mean of that bin's steps alone.
    x, _, ctx = inputs(tokens=5)
    store = AttentionStore(num_steps=4, num_bins=2)
    run_steps(unet, store, 4, x, ctx)
    name = store.layer_names("cross")[-1]
    late = AttentionStore(num_steps=4, num_bins=2)
    with torch.no_grad(), unet.record_attention(late):
        for step in (2, 3):
            late.set_step(step)
            unet(x, torch.full((2,), 999 - step * 10), ctx)
    torch.testing.assert_close(store.mean(name, bins=[1]), late.mean(name, bins=[1]))
    assert not torch.allclose(store.mean(name, bins=[0]), store.mean(name, bins=[1]))
    with pytest.raises(KeyError, match="no maps"):
        late.mean(name, bins=[0])


def test_emphasis_shows_in_the_maps(unet):
    x, _, ctx = inputs(tokens=4)
    weights = torch.ones(2, 4)
    weights[:, 1] = 2.0
    plain, emphasised = AttentionStore(num_steps=1), AttentionStore(num_steps=1)
    run_steps(unet, plain, 1, x, ctx)
    with torch.no_grad(), unet.record_attention(emphasised):
        emphasised.set_step(0)
        unet(x, torch.full((2,), 999), ctx, token_weights=weights)
    first = emphasised.layer_names("cross")[0]  # before any emphasised layer changed the features
    torch.testing.assert_close(emphasised.mean(first)[..., 1], 2 * plain.mean(first)[..., 1])
    torch.testing.assert_close(emphasised.mean(first)[..., 0], plain.mean(first)[..., 0])


@pytest.mark.parametrize(("n", "keys", "dtype"), [(64, 6, torch.float32), (300, 300, torch.float32),
                                                  (64, 64, torch.bfloat16)])
def test_attention_gives_the_same_output_with_the_rows_probabilities(n, keys, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, m, 8, generator=g).to(dtype) for m in (n, keys, keys))
    mask = torch.ones(3, keys, dtype=torch.bool)
    mask[1, keys // 2:] = False
    weights = torch.ones(3, keys, dtype=dtype)
    weights[:, 0] = 2.0
    out, probs = attention(q, k, v, mask, weights, rows=slice(1, 3))
    assert torch.equal(out, attention(q, k, v, mask, weights)[0])
    assert probs.shape == (2, 2, n, keys)
    torch.testing.assert_close(probs, attention_probs(q[1:], k[1:], mask[1:], weights[1:]))
    assert probs[0, :, :, keys // 2:].abs().max() == 0  # masked keys get nothing


def test_context_layers_are_recorded_when_asked():
    """Recording reaches every attention layer, the context layers included (kind "context", text × text)."""
    torch.manual_seed(0)
    unet = randomize_(UNet(UNetConfig.preset("tiny", context_layers=2)).eval())
    x, _, ctx = inputs(tokens=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    stores = [AttentionStore(num_steps=1, context_layers=flag) for flag in (True, False)]
    for store in stores:
        run_steps(unet, store, 1, x, ctx, mask)
    assert stores[0].layer_names("context") == ["context_refiner.layers.0", "context_refiner.layers.1"]
    assert stores[1].layer_names("context") == [] and stores[1].layer_names("cross")
    maps = stores[0].mean("context_refiner.layers.1")  # (b, L, L): each token's attention over the text
    assert maps.shape == (2, 6, 6)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 6))
    assert maps[1, :, 4:].abs().max() == 0  # padding is never attended to
