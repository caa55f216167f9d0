"""The CPU sampling path, beside the model: `optimize_for_inference(unet)` → a faster copy for sampling.

The model in unet/blocks.py and unet/model.py is plain PyTorch and is what trains. This module makes an
inference-only copy of a loaded U-Net whose modules are swapped for twins of the same classes and
parameters (so `state_dict()` keys and values are unchanged) that compute the same function faster on a
CPU without autograd. Each trick stays only while it is worth ≥ ~3% of a guided sampling step (measured
as below; the whole path against the plain model and the old code: BENCHMARKS.md):

- channels-last memory and convolution weights packed once for oneDNN (`PackedConv2d`). On a CPU, oneDNN
  reorders NCHW tensors into its own layout at every call; for this U-Net's small images that reordering,
  not the arithmetic, was most of a convolution (a 3×3 conv at 32×32 × 32 channels, batch 8, bf16: 923 µs
  NCHW, 111 µs NHWC, 99 µs NHWC with the weight packed; fp32: 1,563, 482, 479 µs);
- GroupNorm on small channels-last inputs (`FastGroupNorm`): PyTorch's channels-last kernel loops over a
  group's channels at each position below 1,024 positions (250–1,000 µs against 25–40 µs for NCHW at 8×8
  and 16×16 in bf16). Small bf16 inputs take PyTorch's NCHW kernel through a copy each way, larger or fp32
  ones per-channel sums; a residual block's FiLM is folded into the norm's affine (one pass, not three);
- the position embedding computed once per size (`FastPositionEmbedding`: recomputing it cost 5-12% of a
  guided bf16 step);
- the text side computed once per prompt batch (`CachedContextRefiner`, `CachedTextLinear`): a sampling
  run passes the same text tensors at every step; calls with the *same tensor objects* reuse the refined
  context and every cross-attention layer's keys and values (4-6% of a step);
- SiLU in place on the norms' fresh outputs, and bf16 attention kept in bf16 (fp32 is for training);
- a guided batch's text-free layers once per image (`FastUNet`, 5-6% of a guided step).

Measured by removing each from the optimized shipped U-Net (`python -m benchmarks.fast_ablation`: a guided
bf16 step, CPU time on one thread, three runs on a shared machine): packed convolutions 4-5%, the fast
residual block (FiLM in the norm, in-place SiLU, stacked time MLPs) 15-19%, the stacked time MLPs alone
0-5% (2% on average: at the bar), the text cache 3-8%, the position-embedding cache 2-9%, guided sharing
4-6%. Upsampling as one 2×2 convolution per output phase measured -2% and +1% and was dropped.

The copy is inference-only: its parameters are frozen and it refuses to run under autograd (train, and
differentiate through, the original). Caches derived from the weights are filled on first use, so apply it
after `.to(device, dtype)`, and do not modify the copy's weights or its input text tensors in place. Its
outputs equal the plain model's within float tolerance (tests/test_fast.py).
"""

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet.attention import AttentionProcessor, AttentionRecorder
from unet.blocks import ContextRefiner, PositionEmbedding, ResidualBlock, timestep_embedding
from unet.model import Conditioning, UNet

# PyTorch's channels-last GroupNorm switches to its fast kernel (parallel over positions) here.
NATIVE_GROUP_NORM_MIN_POSITIONS = 1024
# Below that, a bf16 input of up to this many elements is normed by PyTorch's NCHW kernel through a copy each
# way (a bf16 step of the shipped model took 0.944-0.964x with the limit at 2**17 and 1-2% less at 2**19; with
# FiLM folded into the norm's affine 0.97-0.98x); in fp32 the round trip was slower or level. 2-core AVX-512 CPU.
NCHW_ROUND_TRIP_MAX_NUMEL = 2**19


def optimize_for_inference(unet: UNet) -> "FastUNet":
    """A copy of `unet` for sampling on a CPU: the same function, faster; `unet` itself is untouched.

    The copy is frozen (eval, no parameter gradients) and runs only without autograd. On a device other
    than the CPU the copy keeps the plain modules and only its attention stays in bf16.
    """
    fast = copy.deepcopy(unet).eval().requires_grad_(False)
    fast.set_attention_processor(AttentionProcessor(upcast=False))
    cpu = next(fast.parameters()).device.type == "cpu"
    swaps = {nn.Conv2d: PackedConv2d, nn.GroupNorm: FastGroupNorm, ResidualBlock: FastResidualBlock,
             PositionEmbedding: FastPositionEmbedding,
             ContextRefiner: CachedContextRefiner} if cpu else {}
    for module in fast.modules():
        if type(module) in swaps:
            # A twin subclass with no parameters of its own: state_dict keys and values stay the same.
            module.__class__ = swaps[type(module)]
            module.prepare()
    if cpu:
        stack = StackedTimeMLPs([m for m in fast.modules() if isinstance(m, FastResidualBlock) and m.time_mlp])
        for block in stack.blocks:
            block._time_mlps = stack
        for layer in fast.attention_layers.values():
            if layer.kind == "cross":
                for linear in (layer.to_k, layer.to_v):
                    linear.__class__ = CachedTextLinear
                    linear.prepare()
    fast.__class__ = FastUNet
    return fast


class FastUNet(UNet):
    """A U-Net made by `optimize_for_inference`: channels-last inside, NCHW in and out, no autograd.

    A guided batch (diffusion/sampling.py: [x; x] at [t; t] under two texts per image) runs the layers
    before the first cross-attention, which read no text, once per image: 4-5% of a guided step of the
    shipped model (the old `x_repeats`). Recognised by its halves being equal, so nothing else changes.
    """

    def forward(self, x, t, context, context_mask=None, token_weights=None):
        if torch.is_grad_enabled():
            raise RuntimeError("this U-Net was made by optimize_for_inference and runs only without autograd "
                               "(under torch.inference_mode or torch.no_grad); train or differentiate through "
                               "the original U-Net.")
        t = self._check_inputs(x, t, context, context_mask, token_weights)
        x = x.contiguous(memory_format=torch.channels_last)
        half = x.shape[0] // 2
        if x.shape[0] % 2 or not (torch.equal(x[:half], x[half:]) and torch.equal(t[:half], t[half:])):
            return super().forward(x, t, context, context_mask, token_weights).contiguous()  # (B, C_out, H, W)
        return self._forward_guided(x[:half], t, context, context_mask, token_weights).contiguous()

    def _forward_guided(self, x, t, context, mask, weights) -> torch.Tensor:
        """UNet.forward for x (b, C, H, W) holding each image once and the rest for 2b rows."""
        if self.context_refiner is not None:
            context = self.context_refiner(context, mask)  # (2b, L, D)
        t_emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(x.dtype))  # (2b, T)
        cond, once = Conditioning(t_emb, context, mask, weights), Conditioning(t_emb[: x.shape[0]], None, None, None)
        h = self.conv_in(x)  # (b, C0, H, W)
        skips, shared = [h], True  # shared: h holds each image once, until the first cross-attention
        for level, layers in enumerate(self.down):
            for layer in layers:
                h, shared = self._layer(layer, h, cond, once) if shared else (layer(h, cond), False)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        for layer in self.mid:
            h, shared = self._layer(layer, h, cond, once) if shared else (layer(h, cond), False)
        for level in reversed(range(len(self.up))):
            for layer in self.up[level]:
                skip = skips.pop()
                skip = torch.cat([skip, skip]) if skip.shape[0] != h.shape[0] else skip  # from the shared part
                h, shared = self._layer(layer, torch.cat([h, skip], dim=1), cond, once) if shared else \
                    (layer(torch.cat([h, skip], dim=1), cond), False)
            if level > 0:
                h = self.upsample[level - 1](h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return torch.cat([out, out]) if shared else out  # no cross-attention anywhere: nothing read the text

    @staticmethod
    def _layer(layer, h, cond, once) -> tuple[torch.Tensor, bool]:
        """A ResAttnLayer for h holding each image once: to its cross-attention at b rows, then at 2b.
        Returns the output and whether it still holds each image once."""
        h = layer.res(h, once.t_emb)
        if layer.position is not None:
            h = layer.position(h)
        if layer.self_attn is None:
            return h, True
        processor = layer.self_attn.processor
        if processor.recorder is not None:  # the recorder asks for rows of the 2b batch: hand it their images'
            layer.self_attn.processor = processor.with_recorder(_RowsOfRepeatedBatch(processor.recorder))
        try:
            h = layer.self_attn(h)
        finally:
            layer.self_attn.processor = processor
        h = torch.cat([h, h])  # (2b, C, H, W), channels-last kept
        return layer.cross_attn(h, cond.context, cond.mask, cond.token_weights), False


class _RowsOfRepeatedBatch(AttentionRecorder):
    """A recorder's view of a batch of b images that stands for 2b rows (row i + b is image i again)."""

    def __init__(self, inner: AttentionRecorder):
        self.inner = inner

    def wants(self, kind: str, num_queries: int) -> bool:
        return self.inner.wants(kind, num_queries)

    def rows(self, batch_size: int, kind: str) -> torch.Tensor:
        return torch.arange(2 * batch_size)[self.inner.rows(2 * batch_size, kind)] % batch_size  # image per row

    def record(self, name: str, kind: str, size: tuple[int, int], probs: torch.Tensor) -> None:
        self.inner.record(name, kind, size, probs)


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D tensor laid out NHWC (and not also NCHW, as a 1×1 image or one channel is)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@functools.cache
def packed_conv_supports(dtype: torch.dtype) -> bool:
    """Whether this PyTorch and CPU run oneDNN's packed convolution in `dtype`, probed once per dtype with a
    tiny call. Those that cannot keep the plain conv: a build without oneDNN, a platform with the op's schema
    but no CPU kernel, bf16 on a CPU without AVX-512 (oneDNN refuses it there)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(1, 2, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.ones(2, 2, 1, 1, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 1, list(x.shape))
        out = torch.ops.mkldnn._convolution_pointwise(x, packed, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
        return bool(torch.all(out == 2))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d on channels-last input with its weight reordered once into oneDNN's format (the op
    PyTorch's inductor emits for frozen CPU graphs), per input dtype and shape. Returns channels-last."""

    def prepare(self) -> None:
        self._packed: dict[tuple, tuple] = {}  # (dtype, input shape) → (packed weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if torch.is_autocast_enabled("cpu") and x.is_floating_point() and x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype("cpu"))  # as autocast casts F.conv2d's input
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not packed_conv_supports(x.dtype):
            return super().forward(x)  # options or a dtype the packed op does not take
        key = (x.dtype, tuple(x.shape))
        if key not in self._packed:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.to(x.dtype), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape))
            self._packed[key] = (packed, None if self.bias is None else self.bias.to(x.dtype))
        packed, bias = self._packed[key]
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, list(self.padding), list(self.stride), list(self.dilation), self.groups, "none", [], "")


def group_norm_from_sums(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         film: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """F.group_norm for channels-last x (B, C, H, W) from per-channel sums; returns channels-last.

    Statistics in fp32: mean and E[x²] per channel, pooled over each group (E[x²] − mean² loses digits only
    when |mean| ≫ std, which normalised activations are not). film: (scale, shift), each (B, C), or None:
    returns norm(x)·(1 + scale) + shift, folded into the one multiply-add that applies the norm.
    """
    B, C, H, W = x.shape
    G, per_group = num_groups, C // num_groups
    tokens = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view of the channels-last memory
    xf = tokens.float()
    sums = torch.stack([xf.sum(1), (xf * xf).sum(1)]).view(2, B, G, per_group).sum(-1, keepdim=True)
    mean, mean_sq = sums / (H * W * per_group)  # (B, G, 1) each
    rstd = (mean_sq - mean * mean).clamp_min_(0).add_(eps).rsqrt_()
    scale = rstd * weight.float().view(G, per_group)  # (B, G, per_group) is (B, C)
    shift = torch.addcmul(bias.float().view(G, per_group), mean, scale, value=-1)
    if film is not None:
        gain = 1 + film[0].float().view(B, G, per_group)
        scale, shift = scale * gain, torch.addcmul(film[1].float().view(B, G, per_group), shift, gain)
    out = torch.addcmul(shift.view(B, 1, C).to(x.dtype), tokens, scale.view(B, 1, C).to(x.dtype))  # (B, N, C)
    return out.view(B, H, W, C).permute(0, 3, 1, 2)


class FastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm with fast paths for small channels-last inputs, and FiLM folded into it (`modulated`)."""

    def prepare(self) -> None:
        pass

    def _small(self, x: torch.Tensor) -> bool:
        return is_channels_last(x) and x.shape[2] * x.shape[3] < NATIVE_GROUP_NORM_MIN_POSITIONS

    def _round_trips(self, x: torch.Tensor) -> bool:
        return self._small(x) and x.dtype == torch.bfloat16 and x.numel() <= NCHW_ROUND_TRIP_MAX_NUMEL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._round_trips(x):
            return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps).contiguous(
                memory_format=torch.channels_last)
        if self._small(x):
            return group_norm_from_sums(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def modulated(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """self(x)·(1 + scale) + shift for scale, shift (B, C): FiLM in the norm's one pass."""
        if self._small(x) and not self._round_trips(x):
            return group_norm_from_sums(x, self.num_groups, self.weight, self.bias, self.eps, (scale, shift))
        if not self._small(x):  # PyTorch's own kernel is fast here
            return self(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        # One GroupNorm of the batch folded into the channels: (1, B·C, H, W) in B·G groups holds each sample's
        # groups, and its per-channel affine is per (sample, channel), FiLM folded in: one pass, not three.
        B, C, H, W = x.shape
        gain = 1 + scale
        y = F.group_norm(x.contiguous().view(1, B * C, H, W), B * self.num_groups, (self.weight * gain).reshape(-1),
                         torch.addcmul(shift, self.bias, gain).reshape(-1), self.eps).view(B, C, H, W)
        return y.contiguous(memory_format=torch.channels_last)


class StackedTimeMLPs:
    """Every residual block's time MLP (SiLU, Linear) on the same t_emb as one matmul, computed once per
    t_emb tensor object (one U-Net call): 15 small Linears cost ~1 ms of a bf16 step on 2 cores, one with
    their weights stacked ~0.1 ms (measured)."""

    def __init__(self, blocks: list[ResidualBlock]):
        self.blocks = blocks
        linears = [b.time_mlp[1] for b in blocks]
        self.weight = torch.cat([m.weight for m in linears]) if linears else None  # (Σ 2·C, T)
        self.bias = torch.cat([m.bias for m in linears]) if linears else None
        self.sizes = [m.out_features for m in linears]
        self._last: tuple | None = None  # (t_emb, {block: its FiLM (B, 2·C)})

    def film(self, block: ResidualBlock, t_emb: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not t_emb:
            out = F.linear(F.silu(t_emb), self.weight.to(t_emb.dtype), self.bias.to(t_emb.dtype))  # (B, Σ 2·C)
            self._last = (t_emb, dict(zip(self.blocks, out.split(self.sizes, dim=1), strict=True)))
        return self._last[1][block]


class FastResidualBlock(ResidualBlock):
    """ResidualBlock with FiLM folded into norm2, the time MLPs of all blocks stacked (`StackedTimeMLPs`),
    and SiLU in place on the norms' fresh outputs (-2% a step)."""

    def prepare(self) -> None:
        self._time_mlps: StackedTimeMLPs | None = None  # set by optimize_for_inference once all blocks exist

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # (B, C_out, H, W)
        if self.time_mlp is not None and t_emb is not None:
            film = self._time_mlps.film(self, t_emb) if self._time_mlps else self.time_mlp(t_emb)  # (B, 2·C_out)
            scale, shift = film.chunk(2, dim=1)  # 2 × (B, C_out)
            h = self.norm2.modulated(h, scale, shift)
        else:
            h = self.norm2(h)
        return self.conv2(F.silu(h, inplace=True)) + self.skip_connection(x)


class FastPositionEmbedding(PositionEmbedding):
    """PositionEmbedding computed once per size, dtype and device."""

    def prepare(self) -> None:
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        key = (H, W, x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = self.embedding(H, W, x.device).to(x.dtype).contiguous(memory_format=torch.channels_last)
        return x + self._cache[key]


class CachedContextRefiner(ContextRefiner):
    """ContextRefiner that returns its last output again for the same (context, mask) tensor objects."""

    def prepare(self) -> None:
        self._last: tuple | None = None  # (context, mask, output); holding the inputs keeps their ids unique

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self._last is None or self._last[0] is not context or self._last[1] is not mask:
            self._last = (context, mask, super().forward(context, mask))
        return self._last[2]


class CachedTextLinear(nn.Linear):
    """A cross-attention key or value projection that returns its last output again for the same input
    tensor object (the refined context, itself cached, or the caller's context)."""

    def prepare(self) -> None:
        self._last: tuple | None = None  # (input, output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            self._last = (x, super().forward(x))
        return self._last[1]


__all__ = ["FastUNet", "optimize_for_inference"]
