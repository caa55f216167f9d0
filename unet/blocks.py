"""U-Net building blocks, leaf to root.

Shape legend: B batch, C channels, H, W spatial size, N = H·W positions, L text tokens,
D text width (context_dim), h heads, d head dim (C // h), T time-embedding width.

`ResidualBlock` and `AttentionBlock` keep the seed document's parameter names and shapes
(../shared/seed), so a state_dict of the seed's classes loads with strict=True and gives the same
output. They differ from the seed in three ways that do not touch that contract:
- sizes that do not divide raise ValueError (the seed's `assert` vanishes under `python -O`);
- attention runs through `unet.attention.attend` (SDPA or explicit, whichever is faster for the shape)
  and can hand its probabilities to a recorder;
- output projections start at zero (guided-diffusion's `zero_module`), so a fresh block is the
  identity on its residual path and training starts from a stable network.
"""

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet.attention import AttentionRecorder, attend, attend_and_record, explicit_wins
from unet.channels_last import Conv2d, GroupNorm, is_channels_last, versions


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


def conv1x1_on_tokens(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a 1×1 conv to channels-last tokens (B, N, C_in) → (B, N, C_out), as a Linear.

    Same weights and result as the conv on (B, C, H, W), but the output is laid out (B, N, h, d) with
    the head dim contiguous, which SDPA's fused CPU kernel requires: on a (B, h, d, N) view it falls back
    to the math kernel (6× slower and 35× the memory at 1024 tokens, measured).
    """
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, H, W) → (B, N, C) view


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, L, C = t.shape
    return t.view(B, L, num_heads, C // num_heads).transpose(1, 2)  # (B, L, C) → (B, h, L, d)


def merge_heads_to_image(out: torch.Tensor, conv_out: nn.Conv2d, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, N, d) attention output → output projection → (B, C, H, W) (a channels-last view)."""
    B, h, N, d = out.shape
    tokens = conv1x1_on_tokens(conv_out, out.transpose(1, 2).reshape(B, N, h * d))  # (B, N, C)
    return tokens.transpose(1, 2).reshape(B, h * d, *size)


def _silu_inplace(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


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
        self.norm1 = GroupNorm(norm_groups, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_mlp = None
        if time_emb_dim is not None:
            # One Linear gives both scale and shift (FiLM), as in the seed.
            self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, out_channels * 2))
        self.norm2 = GroupNorm(norm_groups, out_channels)
        self.conv2 = zero_(Conv2d(out_channels, out_channels, kernel_size=3, padding=1))
        self.activation = nn.SiLU()
        if in_channels != out_channels:
            self.skip_connection = Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.skip_connection = nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None,
                film: torch.Tensor | None = None) -> torch.Tensor:
        """film: time_mlp(t_emb), (B, 2·C_out), when the caller computed it already (`UNet._films`)."""
        # SiLU in place on the norms' fresh outputs while sampling (autograd needs them kept): -2% a step.
        act = self.activation if torch.is_grad_enabled() else _silu_inplace
        h = self.conv1(act(self.norm1(x)))  # (B, C_out, H, W)
        if film is None and self.time_mlp is not None and t_emb is not None:
            film = self.time_mlp(t_emb)  # (B, 2·C_out)
        if film is not None:
            scale, shift = film.chunk(2, dim=1)  # 2 × (B, C_out)
            h = self.norm2.modulated(h, scale, shift)  # norm2(h)·(1 + scale) + shift
        else:
            h = self.norm2(h)
        if torch.is_grad_enabled() and x.device.type == "cpu" and isinstance(self.skip_connection, nn.Conv2d):
            return self._conv2_plus_projected_skip(act(h), x)
        h = self.conv2(act(h))
        return h + self.skip_connection(x)

    def _conv2_plus_projected_skip(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """conv2(h) + skip_connection(x) for NCHW tensors under autograd: the 1×1 skip as one batched matmul
        that adds onto conv2's output, both biases in the conv. oneDNN's 1×1 convolution backward ran 3-7×
        its forward at 32×32 (batch 32); this form: a U-Net training step 0.98-1.00× fp32, 0.97-0.98× bf16 autocast
        (2-core AVX-512 CPU)."""
        skip = self.skip_connection
        C_out, C_in = skip.weight.shape[:2]
        y = F.conv2d(h, self.conv2.weight, self.conv2.bias + skip.bias, padding=self.conv2.padding)
        weight = skip.weight.view(C_out, C_in).expand(x.shape[0], C_out, C_in)
        return torch.baddbmm(y.flatten(2), weight, x.flatten(2)).view(y.shape)


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention over the H·W positions, with a residual.

    GroupNorm, a 1×1 conv to q/k/v (channels head-major: channel = head·d + i, as in the seed),
    attention over the N positions, a 1×1 conv out.
    Shapes: x (B, C, H, W) → (B, C, H, W).
    """

    kind = "self"

    def __init__(self, channels: int, num_heads: int = 8, *, norm_groups: int = 32):
        super().__init__()
        check_heads(channels, num_heads, "AttentionBlock")
        check_group_norm(channels, norm_groups, "AttentionBlock")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.norm = GroupNorm(norm_groups, channels)
        self.to_qkv = Conv2d(channels, channels * 3, kernel_size=1)
        self.to_out = zero_(Conv2d(channels, channels, kernel_size=1))
        self.name = "attention"  # the U-Net sets the stable layer name, e.g. "down.1.0.self_attn"
        self.recorder: AttentionRecorder | None = None

    def forward(self, x: torch.Tensor, x_repeats: int = 1) -> torch.Tensor:
        """x_repeats > 1: x holds each image once for a batch of x_repeats·B (UNet.forward's x_repeats); the
        recorder is asked for rows of that batch and gets them, each image's map repeated."""
        B, C, H, W = x.shape
        qkv = conv1x1_on_tokens(self.to_qkv, image_to_tokens(self.norm(x)))  # (B, N, 3C), channel = (3, h, d)
        q, k, v = qkv.view(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (B, h, N, d)
        if self.recorder is not None and self.recorder.wants_self_attention(H * W):
            rows = self.recorder.rows(B * x_repeats, self.kind)
            if x_repeats == 1:
                out, probs = attend_and_record(q, k, v, None, self.scale, rows)
            else:  # the recorder's rows of the repeated batch, from the maps of the images behind them
                out, probs = attend_and_record(q, k, v, None, self.scale, slice(0, B))
                images = torch.arange(B * x_repeats, device=x.device)[rows] % B
                if not torch.equal(images, torch.arange(B, device=x.device)):
                    probs = probs[images]
            self.recorder.record(self.name, self.kind, (H, W), probs)
        else:
            out = attend(q, k, v, None, self.scale)  # (B, h, N, d)
        del qkv, q, k, v  # free the projections before the output projection allocates (peak memory)
        # x first: the sum takes x's NCHW layout. The other order made it channels-last, and the next
        # GroupNorm ran 10-30x slower on it (1.0 vs 0.035 ms at 8×64×16×16 in bf16, measured).
        return x + merge_heads_to_image(out, self.to_out, (H, W))


# Cross-attention to a short text takes one of two explicit paths (CrossAttentionBlock.forward):
# - folded, while sampling with the text cached (UNet.cache_text): the query and output projections folded
#   into the text's keys and values once per run (`folded_text`), then two matmuls and a softmax a call,
#   for h·L·C multiply-adds a position instead of C·(C + L). Cached, it was 0.42-0.88x the time of the
#   other paths up to 1.5x their multiply-adds (4 heads, 64 and 128 channels, 8-48 tokens, fp32 and bf16)
#   and 0.93-1.31x at 77 tokens beyond it; a bf16 guided step of the shipped U-Net took 0.95x. Recomputed
#   at every call (no cache: training, the benchmarks' lone blocks) the fold cost up to 1.5x at 64 positions.
# - channel-major: per-head matmuls on the layout NCHW already is, no copies; everything else.
# (Measured on a 2-core AVX-512 CPU.)
FOLDED_MAX_FLOPS_RATIO = 1.5


class CrossAttentionBlock(nn.Module):
    """Image features attend to text tokens: queries from x, keys and values from the context.

    GroupNorm, 1×1 conv to queries; Linear layers from the context width D to keys and values;
    attention over the L tokens with an optional key padding mask; 1×1 conv out; residual.

    Args:
        channels: C.  context_dim: D, the text encoder's hidden size.  num_heads: h.
    Shapes: x (B, C, H, W), context (B, L, D), mask (B, L) bool (True = real token),
        token_weights (B, L) or None, text_cache: a dict kept by `UNet.cache_text` that holds this
        block's keys and values for the text it last saw, or None → (B, C, H, W).

    token_weights scale each token's attention (Prompt-to-Prompt reweighting, not renormalised):
    out = Σ_j p_j·w_j·v_j, computed as attention over values scaled by w, so it stays on the fast kernel.
    Recorded maps show the reweighted attention p·w.
    """

    kind = "cross"

    def __init__(self, channels: int, context_dim: int, num_heads: int = 8, *, norm_groups: int = 32):
        super().__init__()
        check_heads(channels, num_heads, "CrossAttentionBlock")
        check_group_norm(channels, norm_groups, "CrossAttentionBlock")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.norm = GroupNorm(norm_groups, channels)
        self.to_q = Conv2d(channels, channels, kernel_size=1)
        self.to_k = nn.Linear(context_dim, channels)
        self.to_v = nn.Linear(context_dim, channels)
        self.to_out = zero_(Conv2d(channels, channels, kernel_size=1))
        self.name = "cross_attention"
        self.recorder: AttentionRecorder | None = None

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        text_cache: dict | None = None,
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        h, L = self.num_heads, context.shape[1]
        if not explicit_wins(B, h, H * W, L):
            return self._forward_fused(x, context, mask, token_weights, text_cache)
        if text_cache is not None and h * L <= FOLDED_MAX_FLOPS_RATIO * (C + L):
            return self._forward_folded(x, context, mask, token_weights, text_cache)
        return self._forward_channel_major(x, context, mask, token_weights, text_cache)

    def _forward_channel_major(self, x, context, mask, token_weights, text_cache) -> torch.Tensor:
        """forward() with explicit softmax, every tensor laid out channel-major, (B, h, d, N), as NCHW is.

        A short text: no head split or merge copies in any layout. The projections run as batched
        matmuls on x's own memory (NCHW, or channels-last read as a transposed operand), the scores
        come key-major (B, h, L, N), which is both what the queries' layout gives for free and where
        softmax vectorises over the N queries, and the output leaves in channel-major order, ready for
        the output projection. Against the seed's block (1×1 convs, query-major scores, a merge copy):
        1.0-1.7× faster from 64 to 4,096 positions in both layouts, most at the small sizes where the
        seed's copies and reorders weigh most (benchmarks/attention.py).
        """
        B, C, H, W = x.shape
        h, d, N = self.num_heads, self.head_dim, H * W
        keys, values = self._text_side(text_cache, "channel major",
                                       lambda: self.channel_major_text(context, token_weights))
        # (B, C, N) normed input: a view, contiguous or (channels-last) transposed. Each intermediate is
        # dropped as soon as the next exists (peak memory: two or three (B, C, N) tensors, never five).
        q = torch.baddbmm(self.to_q.bias[:, None], self.to_q.weight.view(C, C).expand(B, C, C),
                          self.norm(x).flatten(2))
        scores = torch.matmul(keys, q.view(B, h, d, N))  # (B, h, L, N), the softmax scale is in the keys
        del q
        if mask is not None:
            scores = scores.masked_fill_(~mask[:, None, :, None], float("-inf"))
        probs = scores.softmax(dim=-2)  # each query's softmax over its head's L keys
        del scores
        out = torch.matmul(values, probs).view(B, C, N)  # (B, h, d, N): heads already merged
        if self.recorder is not None:
            rows = self.recorder.rows(B, self.kind)
            self._record(probs[rows].transpose(-1, -2), token_weights, rows, (H, W))  # (b, h, N, L)
        del probs
        w_out = self.to_out.weight.view(C, C)
        if is_channels_last(x):  # sampling on a CPU: return channels-last, like x
            tokens = x.permute(0, 2, 3, 1).reshape(B, N, C)  # a view of x's memory
            y = torch.baddbmm(tokens, out.transpose(1, 2), w_out.t().expand(B, C, C)).add_(self.to_out.bias)
            return y.view(B, H, W, C).permute(0, 3, 1, 2)
        y = torch.baddbmm(x.reshape(B, C, N), w_out.expand(B, C, C), out).add_(self.to_out.bias[:, None])
        return y.view(B, C, H, W)

    def channel_major_text(self, context: torch.Tensor,
                           token_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (B, h, L, d) times the softmax scale, and values (B, h, d, L) times the token weights."""
        k, v = self.head_split_text(context, token_weights)
        return k * self.scale, v.transpose(-1, -2)

    def _forward_fused(self, x, context, mask, token_weights, text_cache) -> torch.Tensor:
        """forward() through SDPA: long texts and large maps, where the explicit probabilities would not pay."""
        B, C, H, W = x.shape
        h = self.num_heads
        tokens = is_channels_last(x)  # sampling on a CPU: x's memory already is (B, N, C) tokens
        if tokens:
            q = split_heads(conv1x1_on_tokens(self.to_q, image_to_tokens(self.norm(x))), h)
        else:
            # The seed's layout: a 1×1 conv on (B, C, H, W), heads read as a transposed view (attend makes
            # it contiguous for SDPA).
            q = self.to_q(self.norm(x)).view(B, h, self.head_dim, H * W).transpose(-1, -2)
        # q: (B, h, N, d)
        k, v = self._text_side(text_cache, "heads", lambda: self.head_split_text(context, token_weights))
        if self.recorder is not None:
            rows = self.recorder.rows(B, self.kind)
            out, probs = attend_and_record(q, k, v, mask, self.scale, rows)  # (B, h, N, d), (b, h, N, L)
            self._record(probs, token_weights, rows, (H, W))
        else:
            out = attend(q, k, v, mask, self.scale)  # (B, h, N, d)
        del q, k, v
        if tokens:
            return x + merge_heads_to_image(out, self.to_out, (H, W))  # channels-last, like x
        return self.to_out(out.transpose(-1, -2).reshape(B, C, H, W)) + x  # (B, h, d, N) → (B, C, H, W)

    def _text_side(self, text_cache: dict | None, layout: str, compute):
        """compute(), or what it returned for the same text earlier in this sampling run (UNet.cache_text)."""
        if text_cache is None:
            return compute()
        key = (self.name, layout)
        if key not in text_cache:
            text_cache[key] = compute()
        return text_cache[key]

    def _record(self, probs: torch.Tensor, token_weights: torch.Tensor | None, rows: slice,
                size: tuple[int, int]) -> None:
        """Hand the recorder probabilities (b, h, N, L) of `rows`, reweighted as the output was."""
        if token_weights is not None:
            probs = probs * token_weights[rows, None, None, :].to(probs.dtype)
        self.recorder.record(self.name, self.kind, size, probs)

    def head_split_text(self, context: torch.Tensor,
                        token_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, h, L, d) per head; values times the token weights."""
        k = split_heads(self.to_k(context), self.num_heads)
        v = split_heads(self.to_v(context), self.num_heads)
        if token_weights is not None:
            v = v * token_weights[:, None, :, None].to(v.dtype)
        return k, v

    def folded_text(
        self, context: torch.Tensor, mask: torch.Tensor | None, token_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The text side with the query and output projections folded in: keys (B, h·L, C), their bias
        (B, h·L, 1) and values (B, h·L, C).

        Head g's score for token j is scale · k_gj · (W_q,g n + b_q,g), where n is a normed position and
        W_q,g the query projection's rows for head g; so keys_gj = scale · k_gj W_q,g (a row of width C)
        and bias_gj = scale · k_gj · b_q,g (−inf at padding tokens) give every head's scores in one matmul
        with the normed image, no query projection. Likewise the output projection of Σ_j p_gj v_gj is
        Σ_j p_gj (v_gj W_out,g), W_out,g its columns for head g, so values_gj = w_j v_gj W_out,g + b_out / h
        (each head's probabilities sum to 1, so the h shares of the bias add up to b_out) give the
        projected output, heads merged, in one more matmul.
        """
        B, L, _ = context.shape
        h, d = self.num_heads, self.head_dim
        C = h * d
        k, v = self.head_split_text(context, token_weights)  # (B, h, L, d) each
        k = k * self.scale
        keys = torch.matmul(k, self.to_q.weight.view(h, d, C)).view(B, h * L, C)
        bias = torch.matmul(k, self.to_q.bias.view(h, d, 1)).view(B, h * L, 1)
        if mask is not None:
            bias = bias.masked_fill(~mask.repeat(1, h)[:, :, None], float("-inf"))
        w_out = self.to_out.weight.view(C, h, d).permute(1, 2, 0)  # (h, d, C): [g, i, c] = W_out[c, g·d + i]
        values = torch.matmul(v, w_out).view(B, h * L, C) + self.to_out.bias / h
        return keys, bias, values

    def _forward_folded(self, x, context, mask, token_weights, text_cache) -> torch.Tensor:
        """forward() with the query and output projections folded into the text side (`folded_text`):
        scores = keys · norm(x) + bias, one softmax, output = x + probabilities · values: two matmuls and a
        softmax in either layout, the normed image read as (B, C, N), contiguous or a transposed view."""
        B, C, H, W = x.shape
        h, L, N = self.num_heads, context.shape[1], H * W
        keys, bias, values = self._text_side(text_cache, "folded",
                                             lambda: self.folded_text(context, mask, token_weights))
        scores = torch.baddbmm(bias, keys, self.norm.any_layout(x).flatten(2))  # (B, h·L, N), key-major
        probs = scores.view(B, h, L, N).softmax(dim=-2)  # each query's softmax over its head's L keys
        del scores
        if self.recorder is not None:
            rows = self.recorder.rows(B, self.kind)
            self._record(probs[rows].transpose(-1, -2), token_weights, rows, (H, W))  # (b, h, N, L)
        if is_channels_last(x):  # sampling on a CPU: x's memory is (B, N, C) tokens; return channels-last
            tokens = x.permute(0, 2, 3, 1).reshape(B, N, C)  # a view
            y = torch.baddbmm(tokens, probs.view(B, h * L, N).transpose(1, 2), values)  # (B, N, C)
            return y.view(B, H, W, C).permute(0, 3, 1, 2)
        y = torch.baddbmm(x.reshape(B, C, N), values.transpose(1, 2), probs.view(B, h * L, N))  # (B, C, N)
        return y.view(B, C, H, W)


class ContextRefiner(nn.Module):
    """Bidirectional transformer layers over the text encoder's hidden states, before cross-attention.

    CLIP's text tower is causal: in "a red circle to the left of a blue square" the tokens of the red
    circle never see the relation that follows them, so the U-Net's cross-attention could read where
    the first object goes only from the tokens after it. These layers let every token see the whole
    prompt. Pre-norm (LayerNorm → self-attention → residual, LayerNorm → MLP → residual), output
    projections zero-initialised: a fresh refiner is the identity, so it can be added to a trained
    U-Net and fine-tuned from exactly where that U-Net was.

    Args:
        dim: D, the context width.  num_layers: how many layers.  num_heads: h (D divisible by h).
    Shapes: context (B, L, D), mask (B, L) bool (True = real token) or None → (B, L, D).
    Padding positions are computed but never attended to (here or by the cross-attention after).
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int):
        super().__init__()
        check_heads(dim, num_heads, "ContextRefiner")
        self.num_heads = num_heads
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            self.layers.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(dim), "to_qkv": nn.Linear(dim, 3 * dim), "to_out": zero_(nn.Linear(dim, dim)),
                "norm2": nn.LayerNorm(dim),
                "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), zero_(nn.Linear(4 * dim, dim))),
            }))

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = context.shape
        keep = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L): every query sees the real tokens
        for layer in self.layers:
            qkv = layer["to_qkv"](layer["norm1"](context))  # (B, L, 3D)
            q, k, v = qkv.view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 × (B, h, L, d)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, h, L, d)
            context = context + layer["to_out"](out.transpose(1, 2).reshape(B, L, D))
            context = context + layer["mlp"](layer["norm2"](context))
        return context


class PositionEmbedding(nn.Module):
    """Where each position is, added to the image features before attention.

    Without it, attention has no notion of place: queries carry only what the features hold, and a
    U-Net's convolutions leak position only through their zero padding. Then no word can ask for a
    place ("in the top left", "to the left of"): measured on the shipped model before this existed,
    the same seed gave the same layout whatever position words the prompt had. (It is needed, not
    enough: 2,000 fine-tune steps with it did not change that yet; see the model card's stage 3.)

    Features: sin and cos of π·2^k·u (k < frequencies) for each axis, u the position's centre as a
    fraction of the image side (so the same weights serve any H, W), through a zero-initialised 1×1
    conv to C channels: a fresh embedding adds nothing, so a trained U-Net gains it as the identity.
    Shapes: x (B, C, H, W) → (B, C, H, W).
    """

    def __init__(self, channels: int, frequencies: int = 4):
        super().__init__()
        self.frequencies = frequencies
        self.proj = zero_(Conv2d(4 * frequencies, channels, kernel_size=1))
        self._cache: dict[tuple, torch.Tensor] = {}  # the embedding while sampling; not in the state_dict

    def features(self, H: int, W: int, device: torch.device) -> torch.Tensor:
        """(4·frequencies, H, W): sin, cos of the row's fraction, then sin, cos of the column's."""
        freqs = math.pi * 2.0 ** torch.arange(self.frequencies, device=device)  # (F,)
        fy = ((torch.arange(H, device=device) + 0.5) / H)[:, None] * freqs  # (H, F)
        fx = ((torch.arange(W, device=device) + 0.5) / W)[:, None] * freqs  # (W, F)
        rows = torch.cat([fy.sin(), fy.cos()], dim=1).T[:, :, None].expand(-1, H, W)  # (2F, H, W)
        cols = torch.cat([fx.sin(), fx.cos()], dim=1).T[:, None, :].expand(-1, H, W)  # (2F, H, W)
        return torch.cat([rows, cols])

    def embedding(self, H: int, W: int, device: torch.device) -> torch.Tensor:
        """(1, C, H, W): the 1×1 conv of the features, as one matmul (C, 4F) @ (4F, H·W) + bias."""
        C = self.proj.out_channels
        pe = torch.addmm(self.proj.bias[:, None], self.proj.weight.view(C, -1),
                         self.features(H, W, device).reshape(-1, H * W).to(self.proj.weight.dtype))
        return pe.view(1, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        if torch.is_grad_enabled():  # training: through autograd, every call
            return x + self.embedding(H, W, x.device).to(x.dtype)
        # Sampling: the embedding depends only on the size and the weights, so it is computed once. The
        # weights' versions are in the key, so any in-place change (an optimizer step, load_state_dict)
        # recomputes it. Recomputing it at every call cost 5-12% of a guided bf16 step (measured).
        layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format  # add in x's layout
        key = (H, W, x.device, x.dtype, layout, versions(self.proj))
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = self.embedding(H, W, x.device).to(x.dtype).contiguous(memory_format=layout)
        return x + self._cache[key]


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 conv. (B, C, H, W) → (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# Each Upsample's phase convolution (Upsample.phase_conv), derived from its weights: a weak table like the
# packed convolutions', so it never enters the module, its state_dict or its copies.
_phase_convs: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# Which of a 3×3 kernel's rows (or columns) each of the two taps of a 2×2 phase kernel sums: an output row
# 2i + a of nearest-upsampled x reads x's rows i − 1, i, i (a = 0) or i, i, i + 1 (a = 1).
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (a, tap, row)


def phase_weights(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3×3 conv's (C, C, 3, 3) weight and bias → the 2×2 conv (4·C outputs, padding 1) whose output block
    2a + b is phase (a, b) of nearest-upsampling then that conv, in the weight's dtype; differentiable.
    The sums of up to four weights are taken in at least fp32 and rounded once (bf16 weights; under autocast,
    by the conv)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    taps = _PHASE_TAPS.to(weight.device, dtype)
    C = weight.shape[0]
    with torch.autocast(weight.device.type, enabled=False):
        phases = torch.einsum("aru,ocuv,bsv->abocrs", taps, weight.to(dtype), taps)  # (2, 2, C, C, 2, 2)
    return phases.reshape(4 * C, C, 2, 2).to(weight.dtype), bias.repeat(4)


def phases_of(out: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The phase conv's output (B, 4·C, H + 1, W + 1), in any layout → a strided view (B, C, H, 2, W, 2) of
    the upsampled image: element (c, i, a, j, b) is out[(2a + b)·C + c, i + a, j + b], an affine function
    of the indices, so one view. Reading it into (B, C, 2H, 2W) is one copy, forward and backward."""
    B, C4 = out.shape[:2]
    C = C4 // 4
    sB, sC, sH, sW = out.stride()
    return out.as_strided((B, C, H, 2, W, 2), (sB, sC, sH, 2 * C * sC + sH, sW, C * sC + sW), out.storage_offset())


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour then a 3×3 conv. (B, C, H, W) → (B, C, 2H, 2W).

    It runs as four 2×2 convolutions on x itself, one per output phase (row and column parity), in one
    conv with 4·C outputs (`phase_weights`), then interleaved: 4 taps an output instead of 9, 2.25× fewer
    multiply-adds than the 3×3 conv over the upsampled image (a bf16 sampling call 0.59-0.66× the time,
    fp32 0.56-0.59×, at batch 8, 8×8 × 128 and 16×16 × 64 channels; a training step of the U-Net at batch
    32 0.95-0.97× fp32, 0.97-0.98× bf16 autocast; measured on a 2-core AVX-512 CPU). Without autograd
    (sampling) the phase conv is derived once per weight version (`phase_conv`); under autograd its
    weights are derived in the graph at every call, so the gradients reach `conv`.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if torch.is_grad_enabled():  # training: the phase weights derived in the graph, so gradients reach conv
            out = F.conv2d(x, *phase_weights(self.conv.weight, self.conv.bias), padding=1)
        else:
            out = self.phase_conv()(x)
        phases = phases_of(out, H, W)
        if is_channels_last(x):  # one copy into channels-last memory (differentiable, as copy_ is)
            out = torch.empty((B, H, 2, W, 2, C), dtype=phases.dtype, device=phases.device)
            out.permute(0, 5, 1, 2, 3, 4).copy_(phases)
            return out.view(B, 2 * H, 2 * W, C).permute(0, 3, 1, 2)
        return phases.reshape(B, C, 2 * H, 2 * W)

    def phase_conv(self) -> Conv2d:
        """The 2×2 conv (padding 1) whose output block 2a + b is phase (a, b) of this upsample's output,
        derived from self.conv once per weight version."""
        w, bias = self.conv.weight, self.conv.bias
        key = (versions(self.conv), w.device)
        entry = _phase_convs.get(self)
        if entry is None or entry[0] != key:
            C = w.shape[0]
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: the packed conv reads versions
                weight, bias = phase_weights(w.detach(), bias.detach())
                conv = Conv2d(C, 4 * C, kernel_size=2, padding=1, device=w.device, dtype=w.dtype)
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)
            entry = _phase_convs[self] = (key, conv.requires_grad_(False))
        return entry[1]
