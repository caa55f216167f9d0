"""U-Net building blocks, leaf to root.

Shape legend: B batch, C channels, H, W spatial size, N = H·W positions, L text tokens,
D text width (context_dim), h heads, d head dim (C // h), T time-embedding width.

`ResidualBlock` and `AttentionBlock` keep the seed document's parameter names and shapes
(../shared/seed), so a state_dict of the seed's classes loads with strict=True and gives the same
output. They differ from the seed in three ways that do not touch that contract:
- sizes that do not divide raise ValueError (the seed's `assert` vanishes under `python -O`);
- attention runs through the seam (`AttentionLayer.attend`, unet/attention.py): SDPA or the explicit
  softmax, whichever is faster for the shape, and a recorder can be handed the probabilities;
- output projections start at zero (guided-diffusion's `zero_module`), so a fresh block is the
  identity on its residual path and training starts from a stable network.

This is the model that trains and samples. The CPU sampling path (unet/fast.py) swaps some of these
modules for faster twins with the same parameters, tested to compute the same function.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet.attention import AttentionLayer


def check_group_norm(channels: int, groups: int, where: str) -> None:
    if channels % groups != 0:
        raise ValueError(
            f"{where}: GroupNorm with {groups} groups needs channels divisible by {groups}, got {channels}. "
            f"Use a multiple of {groups} channels (e.g. {groups * max(1, round(channels / groups))})."
        )


def check_heads(channels: int, num_heads: int, where: str) -> None:
    if num_heads < 1 or channels % num_heads != 0:
        raise ValueError(
            f"{where}: channels ({channels}) must be divisible by num_heads ({num_heads}); "
            f"pick num_heads among the divisors of {channels}."
        )


def zero_(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place and return it (guided-diffusion `zero_module`)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def image_to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, h·d, H, W) → (B, h, N, d); channel = head·d + i, as in the seed. A view when x is channels-last."""
    B, C, H, W = x.shape
    return x.reshape(B, num_heads, C // num_heads, H * W).transpose(-1, -2)


def heads_to_image(out: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, N, d) → (B, h·d, H, W), laid out channels-last: one copy into token order (B, N, h·d), which
    is what a 1×1 conv reads fastest on a CPU and what the sampling path's convolutions take as is."""
    B, h, N, d = out.shape
    tokens = out.transpose(1, 2).reshape(B, N, h * d)  # (B, N, C)
    return tokens.transpose(1, 2).view(B, h * d, *size)


def group_norm_film(norm: nn.GroupNorm, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """norm(x)·(1 + scale) + shift for scale, shift (B, C) (FiLM), as one GroupNorm: the batch folded into the
    channels, (1, B·C, H, W) in B·G groups, holds each sample's groups, and a per-channel affine is then per
    (sample, channel), FiLM folded into it. One pass instead of three; a bf16-autocast training step of the
    shipped U-Net 0.97× the time (2-core AVX-512 CPU, benchmarks/redesign.py's harness)."""
    B, C, H, W = x.shape
    gain = 1 + scale  # (B, C)
    weight, bias = norm.weight * gain, torch.addcmul(shift, norm.bias, gain)  # (B, C) each
    y = F.group_norm(x.reshape(1, B * C, H, W), B * norm.num_groups, weight.reshape(-1), bias.reshape(-1), norm.eps)
    return y.view(B, C, H, W)


def conv_plus_projected_skip(conv: nn.Conv2d, h: torch.Tensor, skip: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(h) + skip(x) for a 1×1 skip conv, with the skip as one batched matmul added onto conv's output and
    both biases in the conv. oneDNN's 1×1 convolution backward ran 3-7× its forward at 32×32 (batch 32); in
    this form a bf16-autocast training step of the shipped U-Net took 0.96× the time (2-core AVX-512 CPU)."""
    C_out, C_in = skip.weight.shape[:2]
    y = F.conv2d(h, conv.weight, conv.bias + skip.bias, conv.stride, conv.padding)  # (B, C_out, H, W)
    weight = skip.weight.view(C_out, C_in).expand(x.shape[0], C_out, C_in)  # (B, C_out, C_in)
    return torch.baddbmm(y.flatten(2), weight, x.flatten(2)).view(y.shape)  # + (B, C_out, C_in) @ (B, C_in, N)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / guided-diffusion.

    Args:
        t: (B,) timesteps.  dim: embedding width (even).
    Returns:
        (B, dim) float32: [cos(t·f_i), sin(t·f_i)] for log-spaced frequencies f_i.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice; the time embedding scales and shifts after the second norm.

    Args:
        in_channels, out_channels: C_in, C_out; a 1×1 conv matches the skip when they differ.
        time_emb_dim: T, or None for a block without time conditioning.
        norm_groups: GroupNorm groups (the seed's 32); channels must be divisible by it.
    Shapes: x (B, C_in, H, W), t_emb (B, T) → (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, time_emb_dim: int | None = None, *, norm_groups: int = 32):
        super().__init__()
        check_group_norm(in_channels, norm_groups, "ResidualBlock in_channels")
        check_group_norm(out_channels, norm_groups, "ResidualBlock out_channels")
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_mlp = None
        if time_emb_dim is not None:
            # One Linear gives both scale and shift (FiLM), as in the seed.
            self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, out_channels * 2))
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.conv2 = zero_(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1))
        self.activation = nn.SiLU()
        if in_channels != out_channels:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.skip_connection = nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.activation(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_mlp is not None and t_emb is not None:
            scale, shift = self.time_mlp(t_emb).chunk(2, dim=1)  # 2 × (B, C_out)
            h = group_norm_film(self.norm2, h, scale, shift)  # norm2(h)·(1 + scale) + shift
        else:
            h = self.norm2(h)
        h = self.activation(h)
        if isinstance(self.skip_connection, nn.Conv2d):
            return conv_plus_projected_skip(self.conv2, h, self.skip_connection, x)  # conv2(h) + skip(x)
        return self.conv2(h) + x


class AttentionBlock(AttentionLayer):
    """Spatial multi-head self-attention over the H·W positions, with a residual.

    GroupNorm, a 1×1 conv to q/k/v (channels head-major: channel = head·d + i, as in the seed),
    attention over the N positions, a 1×1 conv out.
    Shapes: x (B, C, H, W) → (B, C, H, W).
    """

    kind = "self"

    def __init__(self, channels: int, num_heads: int = 8, *, norm_groups: int = 32):
        check_heads(channels, num_heads, "AttentionBlock")
        check_group_norm(channels, norm_groups, "AttentionBlock")
        super().__init__(num_heads)
        self.head_dim = channels // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.to_qkv = nn.Conv2d(channels, channels * 3, kernel_size=1)
        self.to_out = zero_(nn.Conv2d(channels, channels, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=1)  # 3 × (B, C, H, W)
        h = self.num_heads
        out = self.attend(image_to_heads(q, h), image_to_heads(k, h), image_to_heads(v, h), size=(H, W))
        # x first: the sum takes x's layout (NCHW in training), not the channels-last of heads_to_image;
        # the next GroupNorm ran 10-30x slower on channels-last (measured).
        return x + self.to_out(heads_to_image(out, (H, W)))  # (B, C, H, W)


class CrossAttentionBlock(AttentionLayer):
    """Image features attend to text tokens: queries from x, keys and values from the context.

    GroupNorm, 1×1 conv to queries; Linear layers from the context width D to keys and values;
    attention over the L tokens with an optional key padding mask; 1×1 conv out; residual.

    Args:
        channels: C.  context_dim: D, the text encoder's hidden size.  num_heads: h.
    Shapes: x (B, C, H, W), context (B, L, D), mask (B, L) bool (True = real token),
        token_weights (B, L) or None → (B, C, H, W).

    token_weights scale each token's attention (Prompt-to-Prompt reweighting, not renormalised):
    out = Σ_j p_j·w_j·v_j. Recorded maps show the reweighted attention p·w.
    """

    kind = "cross"

    def __init__(self, channels: int, context_dim: int, num_heads: int = 8, *, norm_groups: int = 32):
        check_heads(channels, num_heads, "CrossAttentionBlock")
        check_group_norm(channels, norm_groups, "CrossAttentionBlock")
        super().__init__(num_heads)
        self.head_dim = channels // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.to_q = nn.Conv2d(channels, channels, kernel_size=1)
        self.to_k = nn.Linear(context_dim, channels)
        self.to_v = nn.Linear(context_dim, channels)
        self.to_out = zero_(nn.Conv2d(channels, channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        B, L, _ = context.shape
        h, d = self.num_heads, self.head_dim
        q = image_to_heads(self.to_q(self.norm(x)), h)  # (B, h, N, d)
        k = self.to_k(context).view(B, L, h, d).transpose(1, 2)  # (B, h, L, d)
        v = self.to_v(context).view(B, L, h, d).transpose(1, 2)  # (B, h, L, d)
        out = self.attend(q, k, v, mask, token_weights, size=(H, W))  # (B, h, N, d)
        return x + self.to_out(heads_to_image(out, (H, W)))  # (B, C, H, W)


class ContextLayer(AttentionLayer):
    """One pre-norm transformer layer over the text: LayerNorm → self-attention → residual,
    LayerNorm → MLP → residual; output projections zero-initialised (a fresh layer is the identity).

    Shapes: context (B, L, D), mask (B, L) bool (True = real token) or None → (B, L, D).
    """

    kind = "context"

    def __init__(self, dim: int, num_heads: int):
        check_heads(dim, num_heads, "ContextRefiner")
        super().__init__(num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = zero_(nn.Linear(dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), zero_(nn.Linear(4 * dim, dim)))

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = context.shape
        qkv = self.to_qkv(self.norm1(context))  # (B, L, 3D)
        q, k, v = qkv.view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 × (B, h, L, d)
        out = self.attend(q, k, v, mask)  # (B, h, L, d): every query sees the real tokens
        context = context + self.to_out(out.transpose(1, 2).reshape(B, L, D))
        return context + self.mlp(self.norm2(context))


class ContextRefiner(nn.Module):
    """Bidirectional transformer layers over the text encoder's hidden states, before cross-attention.

    CLIP's text tower is causal: in "a red circle to the left of a blue square" the tokens of the red
    circle never see the relation that follows them, so the U-Net's cross-attention could read where
    the first object goes only from the tokens after it. These layers (`ContextLayer`) let every token
    see the whole prompt. A fresh refiner is the identity, so it can be added to a trained U-Net and
    fine-tuned from exactly where that U-Net was.

    Args:
        dim: D, the context width.  num_layers: how many layers.  num_heads: h (D divisible by h).
    Shapes: context (B, L, D), mask (B, L) bool (True = real token) or None → (B, L, D).
    Padding positions are computed but never attended to (here or by the cross-attention after).
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int):
        super().__init__()
        check_heads(dim, num_heads, "ContextRefiner")
        self.num_heads = num_heads
        self.layers = nn.ModuleList([ContextLayer(dim, num_heads) for _ in range(num_layers)])

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            context = layer(context, mask)  # (B, L, D)
        return context


class PositionEmbedding(nn.Module):
    """Where each position is, added to the image features before attention.

    Without it, attention has no notion of place: queries carry only what the features hold, and a
    U-Net's convolutions leak position only through their zero padding. Then no word can ask for a
    place ("in the top left", "to the left of"): measured on the shipped model before this existed,
    the same seed gave the same layout whatever position words the prompt had.

    Features: sin and cos of π·2^k·u (k < frequencies) for each axis, u the position's centre as a
    fraction of the image side (so the same weights serve any H, W), through a zero-initialised 1×1
    conv to C channels: a fresh embedding adds nothing, so a trained U-Net gains it as the identity.
    Shapes: x (B, C, H, W) → (B, C, H, W).
    """

    def __init__(self, channels: int, frequencies: int = 4):
        super().__init__()
        self.frequencies = frequencies
        self.proj = zero_(nn.Conv2d(4 * frequencies, channels, kernel_size=1))

    def features(self, H: int, W: int, device: torch.device) -> torch.Tensor:
        """(4·frequencies, H, W): sin, cos of the row's fraction, then sin, cos of the column's."""
        freqs = math.pi * 2.0 ** torch.arange(self.frequencies, device=device)  # (F,)
        fy = ((torch.arange(H, device=device) + 0.5) / H)[:, None] * freqs  # (H, F)
        fx = ((torch.arange(W, device=device) + 0.5) / W)[:, None] * freqs  # (W, F)
        rows = torch.cat([fy.sin(), fy.cos()], dim=1).T[:, :, None].expand(-1, H, W)  # (2F, H, W)
        cols = torch.cat([fx.sin(), fx.cos()], dim=1).T[:, None, :].expand(-1, H, W)  # (2F, H, W)
        return torch.cat([rows, cols])

    def embedding(self, H: int, W: int, device: torch.device) -> torch.Tensor:
        """(1, C, H, W): the 1×1 conv of the features."""
        return self.proj(self.features(H, W, device)[None].to(self.proj.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        return x + self.embedding(H, W, x.device).to(x.dtype)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 conv. (B, C, H, W) → (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3×3 conv. (B, C, H, W) → (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
