"""The one attention seam: every attention computation of the U-Net goes through here.

Shapes: B batch, h heads, N queries (H·W for an image, L for the text), L keys, d head dim.

Every module that attends (self-attention over an image, cross-attention to the text, the context
layers over the text) is an `AttentionLayer`: it projects its queries, keys and values itself and then
calls `self.attend(q, k, v, mask, weights, size)`, which hands them to `self.processor`, an
`AttentionProcessor` (the diffusers processor idea, one level down: the projections stay in the block,
readable; only the attention itself is swappable). The default processor computes

    out = softmax(q kᵀ / √d + mask) (weights ⊙ v)

with one of two kernels, the same function either way:
- `sdpa`: PyTorch's fused `scaled_dot_product_attention`, which never materialises the (N, L)
  probabilities. On a 2-core AVX-512 CPU it is 4–5× faster than the explicit softmax for
  self-attention at ≥ 1024 positions and uses 20×+ less memory;
- `attention_probs` then a matmul: the explicit softmax, which wins when the key axis is short
  (cross-attention to a few dozen text tokens, self-attention at 8×8), and which is the one place the
  probabilities exist, so a recorder can be handed them.

With a recorder (`AttentionProcessor(recorder=...)`, attached by `UNet.record_attention`) the output is
computed exactly as without one; the recorded rows' probabilities come from the explicit softmax (shared
with the output where that kernel runs, computed on the side where SDPA runs). Turning maps on never
changes an image. Those are the two softmax implementations in the project: SDPA's and `attention_probs`.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# The explicit kernel runs when the key axis is short AND the (B, h, N, L) probability tensor is
# small; SDPA otherwise. Measured on a 2-core AVX-512 CPU (benchmarks/attention.py): explicit wins by
# 1.1-2.4x for cross-attention to <= 77 tokens up to ~2.5M probabilities and for self-attention at 8×8
# (64 keys: 0.18 vs 0.23 ms in bf16); SDPA wins by 1.5-5x beyond that (at 256 keys 2.1 vs 4.8 ms).
EXPLICIT_MAX_KEYS = 77
EXPLICIT_MAX_PROBS = 3_000_000
# bf16 attention on a CPU runs in fp32 up to this many queries: PyTorch's CPU attention backward in bf16 is
# 1.3-2.8x slower than in fp32 there, casts included (SDPA at 16×16, head dim 16, batch 64: 73.5 vs 43.4 ms
# forward and backward), and a bf16-autocast training step of the U-Net ran 7.7% faster with it. At 1,024
# positions bf16 is faster (80 vs 91 ms). Measured on a 2-core AVX-512 CPU.
UPCAST_MAX_QUERIES = 256


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit softmax: probabilities (B, h, N, L) for q (B, h, N, d), k (B, h, L, d).

    mask: (B, L) bool, True = attend, or None. weights: (B, L) per-key factors applied after the softmax
    (token reweighting, not renormalised), or None. Returns a transposed view of a key-major (B, h, L, N)
    tensor: softmax over dim -2 vectorises over the N queries, where over a short last axis (a dozen
    tokens) it ran 5–16× slower on this CPU (measured, fp32 and bf16).
    """
    scores = torch.matmul(k, q.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (B, h, L, N)
    if mask is not None:
        scores.masked_fill_(~mask[:, None, :, None], float("-inf"))
    probs = scores.softmax(dim=-2)  # in place above: one (B, h, L, N) tensor, not three
    if weights is not None:
        probs = probs * weights[:, None, :, None].to(probs.dtype)
    return probs.transpose(-1, -2)  # (B, h, N, L)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel: (B, h, N, d) output for q (B, h, N, d), k, v (B, h, L, d), mask (B, L) or None."""
    # SDPA's fused CPU kernel needs the head dim contiguous; on a strided view it silently falls back to
    # its math kernel (6× slower and 35× the memory at 1024 tokens, measured).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L) broadcasts over h, N
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def explicit_wins(batch: int, heads: int, num_queries: int, num_keys: int) -> bool:
    """Whether the explicit kernel beats SDPA for this shape (see EXPLICIT_MAX_KEYS)."""
    return num_keys <= EXPLICIT_MAX_KEYS and batch * heads * num_queries * num_keys <= EXPLICIT_MAX_PROBS


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              weights: torch.Tensor | None = None, rows: slice | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention, by whichever kernel is faster for the shape.

    Args:
        q: (B, h, N, d).  k, v: (B, h, L, d).  mask: (B, L) bool, True = attend, or None.
        weights: (B, L) factors on each key's probability (out = Σ_j p_j·w_j·v_j), or None.
        rows: batch rows whose probabilities to return as well, or None.
    Returns:
        out (B, h, N, d), and the probabilities (b, h, N, L) of `rows` (None without rows).
    """
    explicit = explicit_wins(*q.shape[:3], k.shape[-2])
    if explicit:
        probs = attention_probs(q, k, mask, weights)  # (B, h, N, L)
        return torch.matmul(probs, v), None if rows is None else probs[rows]
    if weights is not None:
        v = v * weights[:, None, :, None].to(v.dtype)  # Σ_j p_j·(w_j·v_j): SDPA stays usable
    out = sdpa(q, k, v, mask)
    if rows is None:
        return out, None
    return out, attention_probs(q[rows], k[rows], None if mask is None else mask[rows],
                                None if weights is None else weights[rows])


class AttentionRecorder:
    """What an attention processor hands maps to while recording is on.

    `unet.recording.AttentionStore` is the implementation the pipeline uses; this base class is the
    interface the processor relies on, so a user can plug in their own (e.g. to stream maps elsewhere).
    Kinds: "self" (an image attending to itself), "cross" (an image attending to the text), "context"
    (the text attending to itself, `ContextRefiner`).
    """

    def wants(self, kind: str, num_queries: int) -> bool:
        """Whether to record a layer of this kind with this many queries at the current call."""
        return True

    def rows(self, batch_size: int, kind: str) -> slice:
        """Which batch rows to record (e.g. the conditional half of a guided batch)."""
        return slice(0, batch_size)

    def record(self, name: str, kind: str, size: tuple[int, int], probs: torch.Tensor) -> None:
        """Receive probabilities (b, h, N, L) of layer `name` with queries laid out as `size` (H, W)."""
        raise NotImplementedError


@dataclass(frozen=True)
class AttentionProcessor:
    """How an `AttentionLayer` computes attention: the seam. Subclass it to swap the computation.

    upcast: run bf16 attention on a CPU in fp32 up to UPCAST_MAX_QUERIES queries (faster training there;
        see the constant). The CPU sampling path (unet/fast.py) turns it off: without autograd bf16 was faster.
    recorder: where to hand each call's probabilities, or None.
    """

    upcast: bool = True
    recorder: AttentionRecorder | None = None

    def __call__(self, layer: "AttentionLayer", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, weights: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """out (B, h, N, d) for q (B, h, N, d), k, v (B, h, L, d); size: the queries' (H, W) layout."""
        recorder = self.recorder
        rows = None
        if recorder is not None and recorder.wants(layer.kind, q.shape[-2]):
            rows = recorder.rows(q.shape[0], layer.kind)
        if self.upcast and q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[-2] <= UPCAST_MAX_QUERIES:
            with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 operands back to bf16
                out, probs = attention(q.float(), k.float(), v.float(), mask, weights, rows)
            out = out.to(q.dtype)
        else:
            out, probs = attention(q, k, v, mask, weights, rows)
        if probs is not None:
            recorder.record(layer.name, layer.kind, size, probs.to(q.dtype))
        return out

    def with_recorder(self, recorder: AttentionRecorder | None) -> "AttentionProcessor":
        return replace(self, recorder=recorder)


class AttentionLayer(nn.Module):
    """Base of every module that attends: a stable name, a kind, a head count, and the seam.

    The U-Net names each layer by its module path ("down.1.0.cross_attn") after building it.
    """

    kind = "self"

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.name = type(self).__name__
        self.processor = AttentionProcessor()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               weights: torch.Tensor | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Attention output (B, h, N, d) through this layer's processor; size defaults to (1, N)."""
        return self.processor(self, q, k, v, mask, weights, size or (1, q.shape[-2]))
