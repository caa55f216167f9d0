"""AttentionStore: constant-memory running sums of attention maps, keyed by (layer, step bin).

Shape legend: b recorded batch rows, h heads, N = H·W query positions of the layer, L text tokens.

Lessons from the tools before us (../shared/ATTENTION_MAPS.md):
- the caller sets the step (`set_step`) before each model call; the store never counts calls, so a
  skipped or repeated call cannot shift every later map (Attend-and-Excite's AttentionStore bug);
- maps are summed into a few timestep bins in fp32, so memory does not grow with the number of
  sampling steps (DAAM dropped per-step maps for lack of RAM);
- the key axis is cut to the real tokens at capture time (padding is most of a CLIP context);
- maps stay at the layer's native (H, W), which is stored explicitly: never recovered as sqrt(N).
"""

from dataclasses import dataclass

import torch

from unet.attention import AttentionRecorder


@dataclass(frozen=True)
class LayerInfo:
    """A recorded attention layer: its stable name, "self" or "cross", (H, W) and head count."""

    name: str
    kind: str
    size: tuple[int, int]
    heads: int


class AttentionStore(AttentionRecorder):
    """Collects attention probabilities while `UNet.record_attention(store)` is active.

    Args:
        num_steps: sampling steps the caller will run (steps 0 … num_steps-1 via `set_step`).
        num_bins: timestep bins the steps are summed into (constant memory in num_steps).
        rows: batch rows to record, e.g. slice(B//2, B) for the conditional half of a guided batch;
            None records every row.
        self_attention_rows: rows to record at self-attention layers (default: `rows`); the pipeline
            records cross-attention of both halves (prompt and negative prompt) but self-attention
            of the prompt half only.
        num_tokens: keep the first num_tokens keys of cross-attention (the real tokens); None keeps all.
        self_attention_max_positions: record self-attention only at layers with N ≤ this (16×16 = 256
            by default: an (N, N) map is quadratic, and low resolutions are where maps are semantic).
        per_head: also keep per-head cross-attention sums (b, h, N, L) for the head view.
        self_attention_per_bin: record self-attention at this many steps of each bin, spread evenly and
            centred (1 = the bin's middle step); None records it at every step. Its side probabilities
            are the one real cost of recording (the fused kernel never forms them), and the maps of
            neighbouring steps differ little. Cross-attention is recorded at every step.
        context_layers: also record the context layers' text-to-text attention (b, h, L, L), kind
            "context", at every step, rows as `rows`; off by default (the app shows image maps only).
    """

    def __init__(
        self,
        num_steps: int,
        num_bins: int = 4,
        *,
        rows: slice | None = None,
        self_attention_rows: slice | None = None,
        num_tokens: int | None = None,
        self_attention_max_positions: int = 256,
        per_head: bool = True,
        self_attention_per_bin: int | None = None,
        context_layers: bool = False,
    ):
        if num_steps < 1 or num_bins < 1:
            raise ValueError(f"AttentionStore needs num_steps >= 1 and num_bins >= 1, got {num_steps} and {num_bins}.")
        if self_attention_per_bin is not None and self_attention_per_bin < 1:
            raise ValueError(f"self_attention_per_bin must be >= 1 or None (every step), got {self_attention_per_bin}.")
        self.num_steps = num_steps
        self.num_bins = min(num_bins, num_steps)
        self.row_slices = {"cross": rows, "context": rows,
                           "self": self_attention_rows if self_attention_rows is not None else rows}
        self.context_layers = context_layers
        self.num_tokens = num_tokens
        self.self_attention_max_positions = self_attention_max_positions
        self.per_head = per_head
        self.self_attention_per_bin = self_attention_per_bin
        self._self_steps = frozenset(s for b in range(self.num_bins) for s in self._pick(b, self_attention_per_bin))
        self.step: int | None = None
        self.layers: dict[str, LayerInfo] = {}
        # Sums are kept key-major, (b, L, N) and (b, h, L, N): the layout attention_probs computes in, so
        # summing over heads reads contiguous memory (7× faster than from the (b, h, N, L) view, measured).
        self._sums: dict[tuple[str, int], torch.Tensor] = {}  # (name, bin) -> (b, L, N) sums over heads and steps
        self._head_sums: dict[tuple[str, int], torch.Tensor] = {}  # (name, bin) -> (b, h, L, N) sums over steps
        self._counts: dict[tuple[str, int], int] = {}

    # -- the caller's side: which step is running ---------------------------------------------
    def set_step(self, step: int) -> None:
        """Declare that the next model call(s) belong to sampling step `step` (0-based)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(
                f"step {step} is outside 0..{self.num_steps - 1} (the store was made for {self.num_steps} steps)."
            )
        self.step = step

    def bin_of(self, step: int) -> int:
        return step * self.num_bins // self.num_steps

    def bin_steps(self, bin_index: int) -> range:
        """The sampling steps summed into bin `bin_index`."""
        first = -(-bin_index * self.num_steps // self.num_bins)  # the least s with bin_of(s) == bin_index
        last = -(-(bin_index + 1) * self.num_steps // self.num_bins)
        return range(first, last)

    def self_attention_steps(self, bin_index: int) -> list[int]:
        """The steps of bin `bin_index` at which self-attention is recorded."""
        return sorted(s for s in self.bin_steps(bin_index) if s in self._self_steps)

    def _pick(self, bin_index: int, per_bin: int | None) -> list[int]:
        steps = self.bin_steps(bin_index)
        n = len(steps)
        if per_bin is None or per_bin >= n:
            return list(steps)
        return [steps.start + (2 * i + 1) * n // (2 * per_bin) for i in range(per_bin)]  # centred in n/per_bin parts

    # -- the block's side (AttentionRecorder) ---------------------------------------------------
    def rows(self, batch_size: int, kind: str) -> slice:
        chosen = self.row_slices[kind]
        return chosen if chosen is not None else slice(0, batch_size)

    def wants(self, kind: str, num_queries: int) -> bool:
        if kind == "context":
            return self.context_layers
        if kind != "self":
            return True
        if num_queries > self.self_attention_max_positions:
            return False
        return self.step is None or self.step in self._self_steps  # None: record() says set_step was never called

    @torch.no_grad()
    def record(self, name: str, kind: str, size: tuple[int, int], probs: torch.Tensor) -> None:
        if self.step is None:
            raise RuntimeError(
                "AttentionStore.set_step(step) must be called before the model runs: maps are keyed by the "
                "(layer, step) the caller sets, never by counting calls."
            )
        keys_major = probs.transpose(-1, -2)  # (b, h, L, N): contiguous when it comes from attention_probs
        if kind == "cross" and self.num_tokens is not None:
            keys_major = keys_major[:, :, : self.num_tokens]  # (b, h, L_real, N)
        self.layers.setdefault(name, LayerInfo(name, kind, tuple(size), probs.shape[1]))
        key = (name, self.bin_of(self.step))
        self._accumulate(self._sums, key, keys_major.sum(dim=1, dtype=torch.float32))  # (b, L, N)
        if kind == "cross" and self.per_head:
            self._accumulate(self._head_sums, key, keys_major)  # (b, h, L, N)
        self._counts[key] = self._counts.get(key, 0) + 1

    @staticmethod
    def _accumulate(sums: dict, key: tuple[str, int], value: torch.Tensor) -> None:
        """Add into an fp32 running sum (add_ converts bf16 on the fly: no fp32 copy of `value`)."""
        if key in sums:
            sums[key].add_(value)
        else:
            sums[key] = value.to(torch.float32, copy=True)

    # -- reading maps back ---------------------------------------------------------------------
    def layer_names(self, kind: str) -> list[str]:
        """Recorded layers of one kind ("self" or "cross"), in the order the model ran them."""
        return [n for n, info in self.layers.items() if info.kind == kind]

    def _mean(self, sums: dict, name: str, bins: list[int] | None, heads_summed: bool = False) -> torch.Tensor:
        """Sum over `bins` divided by the recorded steps (× heads if the sums add heads up); back from
        key-major to (…, N, L), on the CPU: the sums stay on the device that recorded them, and maps are
        read to be drawn, exported or scored, all on the CPU."""
        if name not in self.layers:
            raise KeyError(f"no maps recorded for layer {name!r}; recorded layers: {list(self.layers)}")
        bins = list(range(self.num_bins)) if bins is None else bins
        keys = [(name, b) for b in bins if (name, b) in sums]
        if not keys:
            raise KeyError(f"layer {name!r} has no maps in bins {bins} (recorded bins: {self.recorded_bins(name)})")
        total = sum(sums[k] for k in keys)
        per = self.layers[name].heads if heads_summed else 1
        return (total / (per * sum(self._counts[k] for k in keys))).transpose(-1, -2).cpu()

    def recorded_bins(self, name: str) -> list[int]:
        return sorted(b for (n, b) in self._counts if n == name)

    def mean(self, name: str, bins: list[int] | None = None) -> torch.Tensor:
        """Head-mean attention of a layer averaged over the recorded steps in `bins` (all if None).

        Returns (b, N, L) for cross-attention, (b, N, N) for self-attention; rows sum to 1 over the
        kept keys (a cut key axis drops only padding, whose probability is zero under the mask).
        """
        return self._mean(self._sums, name, bins, heads_summed=True)

    def head_mean(self, name: str, bins: list[int] | None = None) -> torch.Tensor:
        """Per-head cross-attention (b, h, N, L) averaged over the recorded steps in `bins`."""
        if not self.per_head:
            raise KeyError("this store was made with per_head=False; pass per_head=True to keep head maps")
        return self._mean(self._head_sums, name, bins)

    def nbytes(self) -> int:
        """Bytes held by the store's tensors (constant in the number of steps)."""
        return sum(t.numel() * t.element_size() for d in (self._sums, self._head_sums) for t in d.values())
