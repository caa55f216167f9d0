"""The denoiser: a U-Net that interleaves spatial self-attention with cross-attention to text.

Imports nothing else of the project (DESIGN.md: data flows app → diffusion → unet).
"""

from unet.attention import AttentionRecorder
from unet.blocks import AttentionBlock, CrossAttentionBlock, ResidualBlock
from unet.model import PRESETS, UNet, UNetConfig
from unet.recording import AttentionStore, LayerInfo

__all__ = [
    "PRESETS", "AttentionBlock", "AttentionRecorder", "AttentionStore", "CrossAttentionBlock", "LayerInfo",
    "ResidualBlock", "UNet", "UNetConfig",
]
