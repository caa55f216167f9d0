"""The text-conditioned U-Net: config, then the layer that interleaves attention, then the model.

Shape legend as in unet/blocks.py: B batch, C channels, H, W, L tokens, D context width, T time width.

Layout (3 levels, num_res_blocks=2, sample_size=32, attention_resolution=16, as in the "cpu" preset):
    conv_in                                               32×32
    down.0.{0,1}   res                                    32×32   → downsample.0
    down.1.{0,1}   res → self_attn → cross_attn           16×16   → downsample.1
    down.2.{0,1}   res → self_attn → cross_attn            8×8
    mid.{0,1}      res → self_attn → cross_attn            8×8
    up.2.{0,1,2}   (concat skip) res → self_attn → cross_attn  8×8  → upsample.1
    up.1.{0,1,2}   (concat skip) res → self_attn → cross_attn 16×16 → upsample.0
    up.0.{0,1,2}   (concat skip) res                       32×32
    norm_out → SiLU → conv_out
`up.i` runs at the same resolution as `down.i`. Every attention block's stable name is its module
path (e.g. "up.1.2.cross_attn"), which is also its state_dict prefix.

Note: no `from __future__ import annotations` here: PyTorchModelHubMixin reads the `config`
annotation at runtime to rebuild the dataclass from config.json.
"""

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download

from unet.attention import AttentionRecorder
from unet.blocks import (
    AttentionBlock,
    ContextRefiner,
    CrossAttentionBlock,
    Downsample,
    PositionEmbedding,
    ResidualBlock,
    Upsample,
    check_group_norm,
    check_heads,
    timestep_embedding,
    zero_,
)
from unet.channels_last import Conv2d, GroupNorm, versions, wants_channels_last


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines the architecture; saved as config.json beside the weights.

    attention_resolution: self+cross attention follow every residual block at levels whose side,
        at `sample_size`, is ≤ this. Which levels get attention is fixed at construction, so the
        same weights also run at other (H, W), non-square included.
    context_dim: width D of the text encoder's hidden states (CLIPTextModel hidden_size).
    context_layers: bidirectional transformer layers run over those hidden states before any
        cross-attention (`ContextRefiner`; 0 = none). CLIP's text tower is causal, so without them
        the tokens of a prompt's first object never see the relation that follows them.
    position_embedding: add where each position is (`PositionEmbedding`) to the features before
        every attention layer, so that words can ask for a place; False = attention is blind to it.
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolution: int = 16
    sample_size: int = 32
    num_heads: int = 4
    context_dim: int = 256
    norm_groups: int = 32
    context_layers: int = 0
    position_embedding: bool = False

    def __post_init__(self):
        # JSON turns tuples into lists; keep the config hashable and comparable.
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        if self.context_layers < 0:
            raise ValueError(f"context_layers must be >= 0 (0 = no context refiner), got {self.context_layers}.")
        if not self.channel_mults or self.num_res_blocks < 1:
            raise ValueError("UNetConfig needs at least one level (channel_mults) and num_res_blocks >= 1.")
        if self.sample_size % self.downsample_factor != 0:
            raise ValueError(
                f"sample_size {self.sample_size} is not divisible by the downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channel_mults) - 1))."
            )
        for level, mult in enumerate(self.channel_mults):
            check_group_norm(self.base_channels * mult, self.norm_groups, f"level width {self.base_channels}×{mult}")
            if self.level_has_attention(level):
                check_heads(self.base_channels * mult, self.num_heads, f"level width {self.base_channels}×{mult}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def time_emb_dim(self) -> int:
        return 4 * self.base_channels

    def level_has_attention(self, level: int) -> bool:
        return self.sample_size // 2**level <= self.attention_resolution

    @classmethod
    def preset(cls, name: str, **overrides) -> "UNetConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; choose one of {sorted(PRESETS)}.")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    # For tests: two levels at 16 px, attention at 8×8 only. ~0.3 M parameters.
    "tiny": UNetConfig(
        base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolution=8,
        sample_size=16, num_heads=2, context_dim=32,
    ),
    # The shipped default: 32 px; 32/64/128 channels at 32×32/16×16/8×8, attention at 16×16 and 8×8.
    # 5.2 M parameters, 9.6 GFLOP per guided step of 4 images: narrow where positions are many, wide
    # where attention works (64 channels everywhere would cost 2.7× the FLOPs for the 32×32 level).
    "cpu": UNetConfig(base_channels=32, channel_mults=(1, 2, 4)),
    # A larger model for a GPU run: 64 px, attention at 16×16 and below.
    "gpu": UNetConfig(base_channels=128, channel_mults=(1, 2, 2, 4), sample_size=64, num_heads=8, context_dim=512),
}


class ResAttnLayer(nn.Module):
    """One residual block, then (at attention levels) self-attention and cross-attention to the text.

    Shapes: x (B, C_in, H, W), t_emb (B, T), context (B, L, D), mask (B, L) → (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig, attention: bool):
        super().__init__()
        g = config.norm_groups
        self.res = ResidualBlock(in_channels, out_channels, config.time_emb_dim, norm_groups=g)
        self.self_attn, self.cross_attn, self.position = None, None, None
        if attention:
            if config.position_embedding:
                self.position = PositionEmbedding(out_channels)
            self.self_attn = AttentionBlock(out_channels, config.num_heads, norm_groups=g)
            self.cross_attn = CrossAttentionBlock(out_channels, config.context_dim, config.num_heads, norm_groups=g)

    def forward(self, x, t_emb, context, mask, token_weights, text_cache=None, film=None, x_repeats=1):
        """x_repeats > 1: x holds each image once and the context x_repeats texts for each (UNet.forward);
        the features are repeated just before cross-attention, the first op that reads the text."""
        x = self.res(x, t_emb, film)
        if self.position is not None:
            x = self.position(x)
        if self.self_attn is not None:
            x = self.self_attn(x, x_repeats)
            if x_repeats > 1:
                x = torch.cat([x] * x_repeats)  # keeps channels-last
            x = self.cross_attn(x, context, mask, token_weights, text_cache)
        return x


class UNet(nn.Module, PyTorchModelHubMixin, library_name="look-inside-diffusion", tags=["text-to-image"]):
    """Text-conditioned diffusion U-Net with self- and cross-attention interleaved.

    forward(x (B, C, H, W), t (B,), context (B, L, D), context_mask (B, L) bool or None,
            token_weights (B, L) or None) → (B, C, H, W).
    H and W must be divisible by `config.downsample_factor`; they need not be equal. token_weights
    scale each token's cross-attention in every layer (1 = unchanged; see CrossAttentionBlock).

    >>> unet = UNet(UNetConfig.preset("tiny"))
    >>> unet(torch.randn(2, 3, 16, 24), torch.tensor([10, 500]), torch.randn(2, 5, 32)).shape
    torch.Size([2, 3, 16, 24])
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        # Sample on a CPU in channels-last with packed conv weights (unet/channels_last.py); False = NCHW
        # everywhere, the path training takes. A runtime switch, not part of the config or the weights.
        self.cpu_channels_last = True
        self._text_cache: dict | None = None  # see cache_text()
        self._stacked_films: tuple | None = None  # see _films()
        c = config
        widths = [c.base_channels * m for m in c.channel_mults]
        self.time_embed = nn.Sequential(
            nn.Linear(c.base_channels, c.time_emb_dim), nn.SiLU(), nn.Linear(c.time_emb_dim, c.time_emb_dim)
        )
        self.context_refiner = (ContextRefiner(c.context_dim, c.context_layers, c.num_heads)
                                if c.context_layers else None)
        self.conv_in = Conv2d(c.in_channels, c.base_channels, kernel_size=3, padding=1)

        # Encoder: remember the width of every tensor pushed on the skip stack.
        skip_widths = [c.base_channels]
        ch = c.base_channels
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, width in enumerate(widths):
            layers = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                layers.append(ResAttnLayer(ch, width, c, c.level_has_attention(level)))
                ch = width
                skip_widths.append(ch)
            self.down.append(layers)
            if level < len(widths) - 1:
                self.downsample.append(Downsample(ch))
                skip_widths.append(ch)

        # Middle: every residual block here is followed by self- and cross-attention too.
        mid_attention = c.level_has_attention(len(widths) - 1)
        self.mid = nn.ModuleList([ResAttnLayer(ch, ch, c, mid_attention) for _ in range(2)])

        # Decoder, built deepest level first but stored under the encoder's level index.
        up = {}
        self.upsample = nn.ModuleList([Upsample(w) for w in widths[1:]])  # upsample.i: level i+1 → i
        for level in reversed(range(len(widths))):
            layers = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                layers.append(ResAttnLayer(ch + skip_widths.pop(), widths[level], c, c.level_has_attention(level)))
                ch = widths[level]
            up[level] = layers
        self.up = nn.ModuleList([up[level] for level in range(len(widths))])

        self.norm_out = GroupNorm(c.norm_groups, ch)
        self.conv_out = zero_(Conv2d(ch, c.out_channels, kernel_size=3, padding=1))

        # Stable names: the module path, so names match state_dict keys and never depend on call order.
        # attention_layers lists them in the order forward() runs them (encoder, middle, decoder).
        path = {module: name for name, module in self.named_modules()}
        self.attention_layers: dict[str, AttentionBlock | CrossAttentionBlock] = {}
        for layers in [*self.down, self.mid, *reversed(self.up)]:
            for block in (b for layer in layers for b in (layer.self_attn, layer.cross_attn) if b is not None):
                block.name = path[block]
                self.attention_layers[block.name] = block
        # The decoder level whose last layer runs the last attention block (the lowest level index with
        # attention: the decoder runs from the deepest level up); None without attention.
        self._last_attention_level = min((level for level in range(len(widths)) if c.level_has_attention(level)),
                                         default=None)
        # The residual blocks whose time MLPs _films() stacks (a plain list, not registered: they stay where they are).
        self._film_blocks = [m for m in self.modules() if isinstance(m, ResidualBlock) and m.time_mlp is not None]

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        *,
        maps_only: bool = False,
        x_repeats: int = 1,
    ) -> torch.Tensor | None:
        """The predicted noise (B, C_out, H, W) for x (B, C_in, H, W) at timesteps t (B,) given the text.

        maps_only: for callers that want only what the attention blocks hand a recorder (layout guidance):
        stop once the last attention block has run and return None. The decoder levels after it feed no
        map; skipping them saved 11-20% of a guidance pass's forward and backward, with the same gradients.
        x_repeats: k > 1 denoises each image of x under k texts at once, as classifier-free guidance does:
        context, context_mask and token_weights then have k·B rows (text j of image i at row j·B + i), t
        stays per image, and the result is the (k·B, C_out, H, W) of the call with x and t repeated k times
        along the batch (torch.cat([x] * k)): the same up to the kernels' summation order, which may depend on
        the batch size (bit-identical for the shipped model at 4 images). The layers before the first
        cross-attention read no text, so they run once per image: 4-5% of a guided step of the shipped model.
        """
        t = self._check_inputs(x, t, context, context_mask, token_weights, x_repeats)
        if maps_only and self._last_attention_level is None:
            return None
        text = self._text_side(context, context_mask, token_weights)  # None outside cache_text() or with autograd
        if text is not None and "context" in text:
            context = text["context"]
        elif self.context_refiner is not None:
            context = self.context_refiner(context, context_mask)  # (B, L, D): every token sees the prompt
            if text is not None:
                text["context"] = context
        cond = (context, context_mask, token_weights, text)  # what every ResAttnLayer's cross-attention reads
        B = x.shape[0]
        if x_repeats > 1:
            t = t.repeat(x_repeats)  # (k·B,): the layers after the text run on the whole batch
        t_emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(x.dtype))  # (k·B, T)
        films = self._films(t_emb)  # sampling: every residual block's scale and shift from one matmul
        channels_last = self.cpu_channels_last and wants_channels_last(x)
        if channels_last:  # sampling on a CPU: every block keeps this layout (unet/channels_last.py)
            x = x.contiguous(memory_format=torch.channels_last)
        shared = x_repeats  # > 1 while h holds each image once: until the first cross-attention has run

        def run(layer: ResAttnLayer, h: torch.Tensor) -> torch.Tensor:
            nonlocal shared
            film = films.get(layer.res)
            if shared == 1:
                return layer(h, t_emb, *cond, film=film)
            h = layer(h, t_emb[:B], *cond, film=None if film is None else film[:B], x_repeats=shared)
            if layer.cross_attn is not None:
                shared = 1
            return h

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for level, layers in enumerate(self.down):
            for layer in layers:
                h = run(layer, h)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)  # (B, C, H/2, W/2)
                skips.append(h)
        for layer in self.mid:
            h = run(layer, h)
        for level in reversed(range(len(self.up))):
            for layer in self.up[level]:
                skip = skips.pop()
                if skip.shape[0] != h.shape[0]:  # a skip from before the text, held once per image
                    skip = torch.cat([skip] * (h.shape[0] // skip.shape[0]))
                h = run(layer, torch.cat([h, skip], dim=1))
            if maps_only and level == self._last_attention_level:
                return None
            if level > 0:
                h = self.upsample[level - 1](h)  # (B, C, 2H, 2W)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)
        if shared > 1:  # no cross-attention anywhere: nothing read the text
            out = torch.cat([out] * shared)
        return out.contiguous() if channels_last else out

    @contextmanager
    def cache_text(self):
        """Compute the text side once per prompt batch for the duration of the `with` block.

        The context refiner and every cross-attention layer's keys and values depend only on the text
        (context, mask, token weights), which a sampling run passes unchanged at every step. Inside this
        block, calls without autograd that pass the *same* tensor objects reuse them (4-6% of a
        sampling step on 2 cores, measured). Do not modify those tensors in place inside the block.

        >>> with unet.cache_text():
        ...     for t in timesteps: x = step(unet(x, t, context, mask), x)
        """
        previous = self._text_cache
        self._text_cache = {}
        try:
            yield
        finally:
            self._text_cache = previous

    def _text_side(self, context, context_mask, token_weights) -> dict | None:
        """The cached text side for these tensor objects (a fresh one on a miss), or None: no caching."""
        if self._text_cache is None or torch.is_grad_enabled():
            return None
        inputs = (context, context_mask, token_weights)
        held = self._text_cache.get("inputs", ())
        # `is`, not ==: the entry holds the inputs, so their ids cannot be reused by new tensors meanwhile.
        if len(held) != 3 or any(a is not b for a, b in zip(held, inputs, strict=True)):
            self._text_cache.clear()
            self._text_cache["inputs"] = inputs
        return self._text_cache

    def _films(self, t_emb: torch.Tensor) -> dict:
        """{residual block: its time MLP's output (B, 2·C)} from one matmul, while sampling; {} under autograd.

        Every residual block applies SiLU and a Linear to the same t_emb; 15 small Linears cost ~1 ms of a
        bf16 step on 2 cores, one with their weights stacked ~0.1 ms. The stacked copy is rebuilt whenever a
        weight changes (data pointer, version or dtype), and it never enters the state_dict.
        """
        if torch.is_grad_enabled():
            return {}
        blocks = self._film_blocks
        linears = [b.time_mlp[1] for b in blocks]
        key = tuple(versions(m) for m in linears)
        if self._stacked_films is None or self._stacked_films[0] != key:
            self._stacked_films = (key, torch.cat([m.weight for m in linears]).detach(),
                                   torch.cat([m.bias for m in linears]).detach())
        out = F.linear(F.silu(t_emb), self._stacked_films[1], self._stacked_films[2])  # (B, Σ 2·C)
        return dict(zip(blocks, out.split([m.out_features for m in linears], dim=1), strict=True))

    def _check_inputs(self, x, t, context, context_mask, token_weights, x_repeats=1) -> torch.Tensor:
        """Validate shapes with messages that say how to fix them; returns t as a (B,) tensor."""
        c = self.config
        if isinstance(x_repeats, bool) or not isinstance(x_repeats, int) or x_repeats < 1:
            raise ValueError(f"x_repeats must be an int >= 1 (the number of texts per image of x), got {x_repeats!r}.")
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, H, W); got shape {tuple(x.shape)}.")
        B, _, H, W = x.shape
        f = c.downsample_factor
        if H % f or W % f:
            fix = f"{-(-H // f) * f}×{-(-W // f) * f}"
            raise ValueError(
                f"image size {H}×{W} is not divisible by {f} (this U-Net halves the resolution "
                f"{len(c.channel_mults) - 1} times); resize or pad to e.g. {fix}."
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            per_image = " (one per image: x_repeats repeats it)" if x_repeats > 1 else ""
            raise ValueError(f"t must be a scalar or have shape ({B},) to match the batch of x{per_image}; "
                             f"got {tuple(t.shape)}.")
        if context.ndim != 3 or context.shape[0] != B * x_repeats:
            rows = f"B={B}" if x_repeats == 1 else f"x_repeats·B={x_repeats}·{B}"
            raise ValueError(f"context must be ({rows}, L, D); got shape {tuple(context.shape)}.")
        if context.shape[2] != c.context_dim:
            raise ValueError(
                f"context width {context.shape[2]} does not match this U-Net's context_dim={c.context_dim} "
                "(the text encoder's hidden size); use the text encoder the U-Net was trained with, or build "
                "the U-Net with context_dim equal to the encoder's hidden_size."
            )
        if token_weights is not None and token_weights.shape != context.shape[:2]:
            raise ValueError(
                f"token_weights must have shape {tuple(context.shape[:2])} (one weight per token); "
                f"got {tuple(token_weights.shape)}."
            )
        if context_mask is not None:
            if context_mask.shape != context.shape[:2] or context_mask.dtype != torch.bool:
                raise ValueError(
                    f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])} (True = real token); "
                    f"got {context_mask.dtype} {tuple(context_mask.shape)}."
                )
            if not bool(context_mask.any(dim=1).all()):
                raise ValueError(
                    "every row of context_mask must keep at least one token (CLIP's start token is always real)."
                )
        return t

    # -- attention recording ------------------------------------------------------------------------
    @contextmanager
    def record_attention(self, recorder: AttentionRecorder):
        """Attach `recorder` to every attention block for the duration of the `with` block.

        >>> store = AttentionStore(num_steps=20)
        >>> with unet.record_attention(store):
        ...     for step, t in enumerate(timesteps):
        ...         store.set_step(step); unet(x, t, context)
        The blocks always get their previous recorder back (None outside any `with`), even if the body
        raises; so a recorder attached inside another's `with` (relation guidance inside a recorded
        sampling run) takes over only for its own block.
        """
        previous = {name: block.recorder for name, block in self.attention_layers.items()}
        for block in self.attention_layers.values():
            block.recorder = recorder
        try:
            yield recorder
        finally:
            for name, block in self.attention_layers.items():
                block.recorder = previous[name]

    # -- save / load: safetensors only, strict keys --------------------------------------------------
    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs):
        """Load config.json + model.safetensors. Never falls back to a pickle; every key must match.

        (The mixin's own loader defaults to strict=False, which loads mismatched keys silently as random
        weights, and falls back to unpickling pytorch_model.bin; neither is acceptable here, so `strict`
        is accepted for API compatibility and ignored.)
        """
        import safetensors.torch

        if "config" not in model_kwargs or model_kwargs["config"] is None:
            raise FileNotFoundError(f"no config.json in {model_id!r}: save the U-Net with UNet.save_pretrained(dir).")
        if Path(model_id).is_dir():
            model_file = Path(model_id) / constants.SAFETENSORS_SINGLE_FILE
            if not model_file.is_file():
                raise FileNotFoundError(
                    f"{model_file} not found: U-Net weights must be saved as safetensors (UNet.save_pretrained)."
                )
        else:
            model_file = hf_hub_download(
                repo_id=model_id, filename=constants.SAFETENSORS_SINGLE_FILE, revision=revision, cache_dir=cache_dir,
                force_download=force_download, token=token, local_files_only=local_files_only,
            )
        model = cls(**model_kwargs)
        mismatch = f"{model_file} does not match the architecture in its config.json"
        try:
            missing, unexpected = safetensors.torch.load_model(
                model, str(model_file), strict=False, device=map_location
            )
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{mismatch}: {e}. Was it saved from a different U-Net config?") from None
        if missing or unexpected:
            raise ValueError(
                f"{mismatch}: missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}. "
                "Was it saved from a different U-Net config?"
            )
        return model.eval()

    def grow(self, context_layers: int | None = None, position_embedding: bool | None = None) -> "UNet":
        """This U-Net, or a copy with fresh parts added: `context_layers` context layers, a position
        embedding. Added parts start at zero output, so the copy computes the same function.

        None, or what the U-Net already has, changes nothing (self when nothing changes). Trained parts
        are never dropped or reshaped: a U-Net with context layers keeps their count, and one with a
        position embedding keeps it.
        """
        have = self.config
        changes = {}
        if context_layers is not None and context_layers != have.context_layers:
            if have.context_layers:
                raise ValueError(f"this U-Net already has {have.context_layers} context layers; {context_layers} "
                                 f"would drop or reshape trained weights. Keep {have.context_layers} (with "
                                 "train.py --init, leave --context-layers out).")
            changes["context_layers"] = context_layers
        if position_embedding is not None and position_embedding != have.position_embedding:
            if have.position_embedding:
                raise ValueError("this U-Net has a trained position embedding; dropping it would change what it "
                                 "draws. Keep it (with train.py --init, leave --position-embedding out).")
            changes["position_embedding"] = True
        if not changes:
            return self
        grown = UNet(replace(have, **changes)).to(next(self.parameters()).device)
        missing, unexpected = grown.load_state_dict(self.state_dict(), strict=False)
        if unexpected or any(not (k.startswith("context_refiner.") or ".position." in k) for k in missing):
            raise RuntimeError(f"growing the U-Net changed other weights: {missing[:5]} {unexpected[:5]}")
        return grown.train(self.training)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["PRESETS", "ResAttnLayer", "UNet", "UNetConfig"]
