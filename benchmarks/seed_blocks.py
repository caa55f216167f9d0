"""The seed document's blocks, transcribed verbatim (../shared/seed/), as the reference our blocks
must match (tests/test_blocks.py) and the peer benchmarks/attention.py times ours against: same
parameter names and shapes (state_dict loads with strict=True), same outputs.
Comments translated; code unchanged.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualBlock(nn.Module):
    def __init__(self, in_channels, out_channels, time_emb_dim=None):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        # optional time-embedding projection
        self.time_mlp = None
        if time_emb_dim is not None:
            self.time_mlp = nn.Sequential(
                nn.SiLU(),
                nn.Linear(time_emb_dim, out_channels * 2)  # scale and shift
            )
        self.norm2 = nn.GroupNorm(32, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.activation = nn.SiLU()
        # skip connection matching
        if in_channels != out_channels:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.skip_connection = nn.Identity()

    def forward(self, x, t_emb=None):
        residual = x
        h = self.norm1(x)
        h = self.activation(h)
        h = self.conv1(h)
        if self.time_mlp is not None and t_emb is not None:
            time_encoding = self.time_mlp(t_emb)
            time_encoding = time_encoding.view(h.shape[0], h.shape[1] * 2, 1, 1)
            scale, shift = torch.chunk(time_encoding, 2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h)
        h = self.activation(h)
        h = self.conv2(h)
        return h + self.skip_connection(residual)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads=8):
        super().__init__()
        assert channels % num_heads == 0, f"Channels ({channels}) must be divisible by num_heads ({num_heads})"
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.norm = nn.GroupNorm(32, channels)
        self.to_qkv = nn.Conv2d(channels, channels * 3, kernel_size=1)
        self.to_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x):
        b, c, h, w = x.shape
        residual = x
        qkv = self.to_qkv(self.norm(x))
        q, k, v = qkv.chunk(3, dim=1)
        q = q.reshape(b * self.num_heads, self.head_dim, h * w)
        k = k.reshape(b * self.num_heads, self.head_dim, h * w)
        v = v.reshape(b * self.num_heads, self.head_dim, h * w)
        attention_scores = torch.bmm(q.transpose(1, 2), k) * self.scale
        attention_probs = F.softmax(attention_scores, dim=-1)
        out = torch.bmm(attention_probs, v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, c, h, w)
        out = self.to_out(out)
        return out + residual


class NaiveCrossAttentionBlock(nn.Module):
    """The seed's cross-attention suggestion written the seed's way (explicit bmm softmax), with our
    parameter names: the naive peer for benchmarks and a second reference for tests."""

    def __init__(self, channels, context_dim, num_heads=8):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.norm = nn.GroupNorm(32, channels)
        self.to_q = nn.Conv2d(channels, channels, kernel_size=1)
        self.to_k = nn.Linear(context_dim, channels)
        self.to_v = nn.Linear(context_dim, channels)
        self.to_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x, context, mask=None):
        b, c, h, w = x.shape
        n_tok = context.shape[1]
        q = self.to_q(self.norm(x)).reshape(b * self.num_heads, self.head_dim, h * w)
        k = self.to_k(context).transpose(1, 2).reshape(b * self.num_heads, self.head_dim, n_tok)
        v = self.to_v(context).transpose(1, 2).reshape(b * self.num_heads, self.head_dim, n_tok)
        scores = torch.bmm(q.transpose(1, 2), k) * self.scale  # (b*heads, h*w, n_tok)
        if mask is not None:
            keep = mask.repeat_interleave(self.num_heads, dim=0)[:, None, :]
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = F.softmax(scores, dim=-1)
        out = torch.bmm(probs, v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return self.to_out(out) + x
