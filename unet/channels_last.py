"""The U-Net's CPU sampling path: channels-last tensors and pre-packed convolution weights.

On a CPU, oneDNN runs convolutions on channels-last (NHWC) memory and reorders NCHW tensors into and
out of its own layout at every call. For this U-Net's small images that reordering, not the
arithmetic, is most of a convolution (measured on 2 cores, batch 8, bf16 on an AMX host: a 3×3 conv
at 32×32 × 32 channels took 923 µs in NCHW, 111 µs in NHWC and 99 µs in NHWC with its weight packed
once; fp32: 1,563, 482 and 479 µs). So while sampling (no autograd, on a CPU) `UNet.forward` turns its
input channels-last and every block keeps that layout:

- `Conv2d` runs oneDNN's convolution on a weight reordered once into oneDNN's own format (the op
  PyTorch's inductor emits for frozen CPU graphs), cached per weight version, dtype and input shape.
  The packed weight lives in a module-level weak table, never in the module: it is an opaque oneDNN
  tensor that state_dict, safetensors and copy.deepcopy cannot handle.
- `GroupNorm` on channels-last input below 1,024 positions computes its statistics from per-channel
  sums (two reductions that vectorise along the channels, then a few (B, C) ops) and applies them in
  one fused multiply-add. PyTorch's own channels-last GroupNorm loops over a group's 4 channels at
  each position there: 250–1,000 µs against 25–40 µs for NCHW at 8×8 and 16×16 (bf16), where this
  path takes about 100 µs. Small bf16 inputs go through PyTorch's NCHW kernel instead, a copy each way
  (`NCHW_ROUND_TRIP_MAX_NUMEL`); with a residual block's FiLM, as one norm of the batch folded into the
  channels whose affine carries the FiLM (`GroupNorm.modulated`). From 1,024 positions on, PyTorch's
  kernel is fast and is used.
- Attention blocks read the image as tokens (B, N, C), which channels-last memory already is.

Training and anything else under autograd keeps the NCHW path: the packed op has no backward, and
that path is what the training benchmarks measured. Both paths compute the same function (tests
compare them: within 1e-4 in fp32).
"""

import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.cache
def packed_conv_supports(dtype: torch.dtype) -> bool:
    """Whether this PyTorch and CPU can run oneDNN's packed convolution in `dtype`, probed once per dtype
    with a tiny call (~2 ms). Those that cannot keep the plain conv: a build without oneDNN, a platform
    that registers the op's schema but no CPU kernel, and bf16 on a CPU without AVX-512 (oneDNN refuses
    it there: "bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")."""
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


# PyTorch's channels-last GroupNorm switches to its fast kernel (parallel over positions) here.
NATIVE_GROUP_NORM_MIN_POSITIONS = 1024
# Below that, a bf16 input of up to this many elements is normed by PyTorch's NCHW kernel through a copy
# each way. Alone, at batch 8: 8×8 × 64-256 channels 44-83 µs against 80-105 µs from sums, 16×16 × 32-64
# channels 50-81 against 79-105 µs, but 16×16 × 128 218 against 166 µs; inside a sampling step the sums'
# fp32 copies cost more than alone (the tokens of 8 × 192 × 16×16 took 0.73 ms to copy and square), and a
# bf16 step of the shipped model took 0.944-0.964x with this limit at 2**17 and another 1-2% less at
# 2**19 (which takes every norm below 32×32 there). In fp32 the round trip is slower or level. With FiLM
# as a multiply-add after it, one more pass, it was level too; with FiLM folded into the norm's affine
# (GroupNorm.modulated) a bf16 step took 0.97-0.98x. Measured on a 2-core AVX-512 CPU.
NCHW_ROUND_TRIP_MAX_NUMEL = 2**19

_packed: "weakref.WeakKeyDictionary[nn.Conv2d, tuple]" = weakref.WeakKeyDictionary()


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D tensor laid out NHWC (and not also NCHW, as a 1×1 image or one channel is)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def wants_channels_last(x: torch.Tensor) -> bool:
    """Whether `UNet.forward` should run this call channels-last: a CPU tensor with autograd off."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and torch.backends.mkldnn.is_available()


def versions(module: nn.Module) -> tuple:
    """(data pointer, version, dtype) of each of a module's own parameters: the key of a cache derived from them.
    Any in-place change (an optimizer step, load_state_dict), a new tensor or a cast changes it."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in module._parameters.values() if p is not None)


def packed_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for channels-last x on a CPU without autograd, with the weight packed once, in x's dtype.

    Returns the same values as conv(x) (to oneDNN's summation order) in x's dtype, laid out channels-last.
    The weight and bias are cast to x's dtype first where they differ (bf16 autocast: what autocast casts
    for F.conv2d at every call, here once per weight version).
    """
    w, b = conv.weight, conv.bias
    key = (versions(conv), x.dtype, tuple(x.shape))
    entry = _packed.get(conv)
    if entry is None or entry[0] != key:
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w.detach().to(x.dtype), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            list(x.shape))
        entry = _packed[conv] = (key, packed, None if b is None else b.detach().to(x.dtype))
    return torch.ops.mkldnn._convolution_pointwise(
        x, entry[1], entry[2], list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "none", [], "")


def group_norm_channels_last(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float, film: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """F.group_norm for channels-last x (B, C, H, W), from per-channel sums; returns channels-last.

    Statistics in fp32 whatever x's dtype: mean and E[x²] per channel, pooled over each group's
    channels. (E[x²] − mean² loses digits only when |mean| ≫ std, which normalised activations are not.)
    film: (scale, shift), each (B, C), or None: returns norm(x)·(1 + scale) + shift, folded into the one
    multiply-add that applies the norm (a residual block's time conditioning; two passes fewer).
    """
    B, C, H, W = x.shape
    G, per_group = num_groups, C // num_groups
    tokens = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view of the channels-last memory
    xf = tokens.float()
    sums = torch.stack([xf.sum(1), (xf * xf).sum(1)]).view(2, B, G, per_group).sum(-1, keepdim=True)
    mean, mean_sq = sums / (H * W * per_group)  # (B, G, 1) each
    rstd = (mean_sq - mean * mean).clamp_min_(0).add_(eps).rsqrt_()
    # Per (b, group, channel in group), so no (B, G) → (B, C) expansion op: (B, G, per_group) is (B, C).
    scale = rstd * weight.float().view(G, per_group)
    shift = torch.addcmul(bias.float().view(G, per_group), mean, scale, value=-1)
    if film is not None:
        gain = 1 + film[0].float().view(B, G, per_group)
        scale, shift = scale * gain, torch.addcmul(film[1].float().view(B, G, per_group), shift, gain)
    out = torch.addcmul(shift.view(B, 1, C).to(x.dtype), tokens, scale.view(B, 1, C).to(x.dtype))  # (B, N, C)
    return out.view(B, H, W, C).permute(0, 3, 1, 2)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict keys) that packs its weight for channels-last sampling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and not torch.is_grad_enabled() and is_channels_last(x)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):  # what the op pads
            if torch.is_autocast_enabled("cpu") and x.is_floating_point() and x.dtype != torch.float64:  # as autocast
                x = x.to(torch.get_autocast_dtype("cpu"))
            if packed_conv_supports(x.dtype):
                return packed_conv2d(self, x)
        return super().forward(x)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state_dict keys) with a fast path for small channels-last inputs."""

    def uses_sums(self, x: torch.Tensor) -> bool:
        return is_channels_last(x) and x.shape[2] * x.shape[3] < NATIVE_GROUP_NORM_MIN_POSITIONS and self.affine

    def round_trips(self, x: torch.Tensor) -> bool:
        """Whether x (small, channels-last, bf16) is normed by PyTorch's NCHW kernel, a copy each way."""
        return self.uses_sums(x) and x.dtype == torch.bfloat16 and x.numel() <= NCHW_ROUND_TRIP_MAX_NUMEL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.round_trips(x):
            return self.any_layout(x).contiguous(memory_format=torch.channels_last)
        if self.uses_sums(x):
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def any_layout(self, x: torch.Tensor) -> torch.Tensor:
        """self(x), in whichever layout it comes out of cheapest: for a caller that reads it as (B, C, N)
        through a matmul, which takes either. A small bf16 channels-last x then skips the copy back."""
        if self.round_trips(x):
            return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
        return self(x)

    def modulated(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """self(x)·(1 + scale) + shift for scale, shift (B, C): FiLM, fused into the norm where it can be."""
        if self.uses_sums(x) and not self.round_trips(x):
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps, (scale, shift))
        if is_channels_last(x) and not self.uses_sums(x):  # PyTorch's channels-last kernel is fast here
            return self(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        # One GroupNorm of the batch folded into the channels: (1, B·C, H, W) in B·G groups holds each sample's
        # groups, and its per-channel affine is then per (sample, channel), FiLM folded in: one pass, not three.
        B, C, H, W = x.shape
        gain = 1 + scale
        weight = gain if self.weight is None else self.weight * gain
        bias = shift if self.bias is None else torch.addcmul(shift, self.bias, gain)
        y = F.group_norm(x.contiguous().view(1, B * C, H, W), B * self.num_groups, weight.reshape(B * C),
                         bias.reshape(B * C), self.eps).view(B, C, H, W)
        return y.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else y
