"""The one attention computation every block goes through, and the seam that exposes its maps.

Shapes: B batch, h heads, N query positions (H·W), L keys (N for self-attention, text tokens for
cross-attention), d head dim.

Two kernels compute the same thing:
- `scaled_dot_product_attention` (SDPA): fused, never materialises the (N, L) probabilities. On this
  CPU it is 4–5× faster than an explicit softmax for self-attention at ≥ 1024 tokens and uses 20×+
  less memory, but it is *slower* for short key axes (cross-attention to a few dozen text tokens).
- explicit `softmax(q kᵀ) v` in two batched matmuls, which wins when L is small.
`attend` picks per call from the shape (thresholds from `benchmarks/attention.py`).

Recording never changes the output: the output is always computed by the kernel `attend` picks, and
the probabilities for the recorder are computed on the side for the recorded rows only. So turning
maps on cannot change an image.
"""

import torch
import torch.nn.functional as F

# The explicit kernel runs when the key axis is short AND the (B, h, N, L) probability tensor is
# small; SDPA otherwise. Measured on a 2-core AVX-512 CPU (benchmarks/attention.py, BENCHMARKS.md):
# explicit wins by 1.1-2.4x for cross-attention to <= 77 tokens up to ~2.5M probabilities, SDPA wins
# by 1.5-5x beyond that and for self-attention at >= 256 positions (and never materialises the map).
EXPLICIT_MAX_KEYS = 77
EXPLICIT_MAX_PROBS = 3_000_000


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Softmax attention probabilities.

    Args:
        q: (B, h, N, d) queries.  k: (B, h, L, d) keys.
        mask: (B, L) bool, True = attend, or None.
    Returns:
        (B, h, N, L) probabilities (a transposed view of a key-major tensor); every row sums to 1 over
        the kept keys.
    """
    # Key-major (B, h, L, N), softmax over dim -2: the CPU kernel then vectorises over the N queries.
    # Over a short last axis (a dozen text tokens) softmax is 5–16× slower on this CPU (measured, fp32
    # and bf16), and that alone was a tenth of a U-Net step. In place: one (B, h, L, N) tensor instead
    # of three (autograd allows it: matmul's backward does not need its output).
    scores = torch.matmul(k, q.transpose(-1, -2)).mul_(scale)  # (B, h, L, N)
    if mask is not None:
        scores.masked_fill_(~mask[:, None, :, None], float("-inf"))
    return scores.softmax(dim=-2).transpose(-1, -2)


def explicit_wins(batch: int, heads: int, num_queries: int, num_keys: int) -> bool:
    """Whether the explicit kernel beats SDPA for attention of (batch, heads) rows of `num_queries` over
    `num_keys` keys.

    Explicit when the probability tensor is small and the key axis is short: cross-attention to text,
    and self-attention at 8×8 (64 keys: 0.18 vs 0.23 ms in bf16, 0.15 vs 0.23 ms in fp32, batch 8,
    4 heads). From 144 keys on, SDPA's flash kernel wins in bf16 too: at 256 keys 2.1 vs 4.8 ms, as the
    (B, h, N, N) scores outgrow the cache (measured on this CPU).
    """
    return num_keys <= EXPLICIT_MAX_KEYS and batch * heads * num_queries * num_keys <= EXPLICIT_MAX_PROBS


def upcasts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether to run bf16 attention in fp32 (operands cast up, the output cast back): on a CPU, under
    autograd (training in bf16 autocast, the app's layout guidance), up to 256 positions.

    PyTorch's CPU attention backward in bf16 is 1.3-2.8x slower than in fp32 there, casts included (SDPA
    at 16x16 with a head dim of 16, batch 64: 73.5 vs 43.4 ms forward and backward; the explicit kernel
    at 8x8, batch 4: 0.95 vs 0.46 ms); a bf16 autocast training step of the U-Net ran 7.7% faster with it.
    At 1,024 positions bf16 is faster (80 vs 91 ms at a head dim of 16), and without autograd fp32 SDPA
    was 7-9% faster alone but a sampling step 2-3% slower with it (the casts), so both keep bf16
    (measured on a 2-core AVX-512 CPU).
    """
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[-2] <= 256
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Multi-head attention output.

    Args:
        q: (B, h, N, d).  k, v: (B, h, L, d).  mask: (B, L) bool, True = attend, or None.
    Returns:
        (B, h, N, d).
    """
    if upcasts(q, k, v):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 operands back to bf16
            return attend(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)
    if explicit_wins(*q.shape[:3], k.shape[-2]):
        return torch.matmul(attention_probs(q, k, mask, scale), v)  # (B, h, N, d)
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L) broadcasts over h, N
    # SDPA's fused CPU kernel needs the head dim contiguous; on a strided view it silently falls back to
    # its math kernel (6× slower and 35× the memory at 1024 tokens, measured).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def attend_and_record(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, rows: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend`, plus the probabilities (b, h, N, L) of batch rows `rows` for a recorder.

    The output is bit-identical to attend()'s: where attend runs the explicit kernel, its probabilities
    are computed once and shared (recording then costs nothing extra); where it runs SDPA, the recorded
    rows' probabilities are computed on the side.
    """
    if upcasts(q, k, v):  # as attend() computes it
        with torch.autocast("cpu", enabled=False):
            out, probs = attend_and_record(q.float(), k.float(), v.float(), mask, scale, rows)
        return out.to(q.dtype), probs.to(q.dtype)
    if explicit_wins(*q.shape[:3], k.shape[-2]):
        probs = attention_probs(q, k, mask, scale)
        return torch.matmul(probs, v), probs[rows]
    return attend(q, k, v, mask, scale), attention_probs(q[rows], k[rows], None if mask is None else mask[rows], scale)


class AttentionRecorder:
    """What an attention block hands its maps to while recording is on.

    `unet.recording.AttentionStore` is the implementation; this base class is the interface blocks
    rely on, so a user can plug in their own (e.g. to stream maps elsewhere).
    """

    def rows(self, batch_size: int, kind: str) -> slice:
        """Which batch rows to record for a "self" or "cross" layer (e.g. the conditional half)."""
        return slice(0, batch_size)

    def wants_self_attention(self, num_queries: int) -> bool:
        """Whether to record a self-attention map with this many query positions."""
        return True

    def record(self, name: str, kind: str, size: tuple[int, int], probs: torch.Tensor) -> None:
        """Receive probabilities (b, h, N, L) of layer `name` ("self" or "cross" kind) at size (H, W)."""
        raise NotImplementedError
