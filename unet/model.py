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

from unet.attention import AttentionLayer, AttentionProcessor, AttentionRecorder
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
    # The clip-art model: 64 px; 16/32/64/128 channels at 64/32/16/8 px, attention at 16×16 and 8×8, GroupNorm
    # of 16 groups (the 16-channel level). 5.0 M parameters. Chosen by measurement (data/README.md): 1.47 CPU s
    # a training step of 32 against 2.36 for `cpu` at 64 px, and 4 images × 20 steps with maps in 1.31× the
    # shipped 32 px model's time (1.88 against 1.44 s, one thread). weights/clipart trained it at 64 px, then at
    # 32 px (`train.py --resolution 32`: attention at 8×8 and 4×4), which drew things recognisably sooner.
    "c64n": UNetConfig(base_channels=16, channel_mults=(1, 2, 4, 8), sample_size=64, norm_groups=16),
    # A larger model for a GPU run: 64 px, attention at 16×16 and below.
    "gpu": UNetConfig(base_channels=128, channel_mults=(1, 2, 2, 4), sample_size=64, num_heads=8, context_dim=512),
}


@dataclass(frozen=True)
class Conditioning:
    """What every layer of the U-Net may read besides the image (one contract for all blocks, as
    guided-diffusion's TimestepBlock and k-diffusion's cond dict): t_emb (B, T), context (B, L, D),
    mask (B, L) bool or None, token_weights (B, L) or None."""

    t_emb: torch.Tensor
    context: torch.Tensor
    mask: torch.Tensor | None
    token_weights: torch.Tensor | None


class ResAttnLayer(nn.Module):
    """One residual block, then (at attention levels) self-attention and cross-attention to the text.

    Shapes: x (B, C_in, H, W), cond (see Conditioning) → (B, C_out, H, W).
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

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = self.res(x, cond.t_emb)
        if self.position is not None:
            x = self.position(x)
        if self.self_attn is not None:
            x = self.self_attn(x)
            x = self.cross_attn(x, cond.context, cond.mask, cond.token_weights)
        return x


# What PyTorchModelHubMixin writes as unet/README.md (its default is a "[More Information Needed]" placeholder).
UNET_CARD = """---
{{ card_data }}
---

The denoiser of a look-inside-diffusion pipeline folder (`UNetConfig` in `config.json`, weights in
`model.safetensors`). The model card is the folder's `README.md`, one level up; load the whole folder with
`TextToImagePipeline.from_pretrained`.
"""


class UNet(nn.Module, PyTorchModelHubMixin, library_name="look-inside-diffusion", tags=["text-to-image"],
           model_card_template=UNET_CARD):
    """Text-conditioned diffusion U-Net with self- and cross-attention interleaved.

    forward(x (B, C, H, W), t (B,) or scalar, context (B, L, D), context_mask (B, L) bool or None,
            token_weights (B, L) or None) → (B, C, H, W).
    H and W must be divisible by `config.downsample_factor`; they need not be equal. token_weights
    scale each token's cross-attention in every layer (1 = unchanged; see CrossAttentionBlock).
    Classifier-free guidance batches the two texts per image outside (diffusion/sampling.py).

    >>> unet = UNet(UNetConfig.preset("tiny"))
    >>> unet(torch.randn(2, 3, 16, 24), torch.tensor([10, 500]), torch.randn(2, 5, 32)).shape
    torch.Size([2, 3, 16, 24])
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        widths = [c.base_channels * m for m in c.channel_mults]
        self.time_embed = nn.Sequential(
            nn.Linear(c.base_channels, c.time_emb_dim), nn.SiLU(), nn.Linear(c.time_emb_dim, c.time_emb_dim)
        )
        self.context_refiner = (ContextRefiner(c.context_dim, c.context_layers, c.num_heads)
                                if c.context_layers else None)
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, kernel_size=3, padding=1)

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

        self.norm_out = nn.GroupNorm(c.norm_groups, ch)
        self.conv_out = zero_(nn.Conv2d(ch, c.out_channels, kernel_size=3, padding=1))

        # Stable names: the module path, so names match state_dict keys and never depend on call order.
        # attention_layers lists them in the order forward() runs them (context, encoder, middle, decoder).
        path = {module: name for name, module in self.named_modules()}
        order = [*(self.context_refiner.layers if self.context_refiner is not None else [])]
        for layers in [*self.down, self.mid, *reversed(self.up)]:
            order += [b for layer in layers for b in (layer.self_attn, layer.cross_attn) if b is not None]
        self.attention_layers: dict[str, AttentionLayer] = {}
        for block in order:
            block.name = path[block]
            self.attention_layers[block.name] = block

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The predicted noise (B, C_out, H, W) for x (B, C_in, H, W) at timesteps t (B,) given the text."""
        t = self._check_inputs(x, t, context, context_mask, token_weights)
        if self.context_refiner is not None:
            context = self.context_refiner(context, context_mask)  # (B, L, D): every token sees the prompt
        t_emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(x.dtype))  # (B, T)
        cond = Conditioning(t_emb, context, context_mask, token_weights)
        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for level, layers in enumerate(self.down):
            for layer in layers:
                h = layer(h, cond)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)  # (B, C, H/2, W/2)
                skips.append(h)
        for layer in self.mid:
            h = layer(h, cond)
        for level in reversed(range(len(self.up))):
            for layer in self.up[level]:
                h = layer(torch.cat([h, skips.pop()], dim=1), cond)  # (B, C, H, W) after the skip's concat
            if level > 0:
                h = self.upsample[level - 1](h)  # (B, C, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)

    def _check_inputs(self, x, t, context, context_mask, token_weights) -> torch.Tensor:
        """Validate shapes with messages that say how to fix them; returns t as a (B,) tensor."""
        c = self.config
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
            raise ValueError(f"t must be a scalar or have shape ({B},) to match the batch of x; got {tuple(t.shape)}.")
        if context.ndim != 3 or context.shape[0] != B:
            raise ValueError(f"context must be (B={B}, L, D); got shape {tuple(context.shape)}.")
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

    # -- the attention seam -------------------------------------------------------------------------
    def set_attention_processor(self, processor: AttentionProcessor) -> None:
        """Compute every attention layer's attention with `processor` (unet/attention.py)."""
        for layer in self.attention_layers.values():
            layer.processor = processor

    @contextmanager
    def record_attention(self, recorder: AttentionRecorder):
        """Hand every attention layer's probabilities to `recorder` for the duration of the `with` block.

        >>> store = AttentionStore(num_steps=20)
        >>> with unet.record_attention(store):
        ...     for step, t in enumerate(timesteps):
        ...         store.set_step(step); unet(x, t, context)
        Each layer's processor is swapped for the same processor with the recorder attached, so the
        output does not change. The layers always get their previous processor back, even if the body
        raises; so a recorder attached inside another's `with` (relation guidance inside a recorded
        sampling run) takes over only for its own block.
        """
        previous = {name: layer.processor for name, layer in self.attention_layers.items()}
        for layer in self.attention_layers.values():
            layer.processor = layer.processor.with_recorder(recorder)
        try:
            yield recorder
        finally:
            for name, layer in self.attention_layers.items():
                layer.processor = previous[name]

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


__all__ = ["PRESETS", "Conditioning", "ResAttnLayer", "UNet", "UNetConfig"]
