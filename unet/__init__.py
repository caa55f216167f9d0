"""The denoiser: a U-Net that interleaves spatial self-attention with cross-attention to text.

Imports nothing else of the project (DESIGN.md: data flows app → diffusion → unet).
unet/blocks.py and unet/model.py are the model; unet/attention.py the attention seam; unet/recording.py
the map store; unet/fast.py the CPU sampling path, applied to a loaded model (`optimize_for_inference`).
"""

from unet.attention import AttentionLayer, AttentionProcessor, AttentionRecorder
from unet.blocks import AttentionBlock, CrossAttentionBlock, ResidualBlock
from unet.model import PRESETS, UNet, UNetConfig
from unet.recording import AttentionStore, LayerInfo

__all__ = [
    "PRESETS", "AttentionBlock", "AttentionLayer", "AttentionProcessor", "AttentionRecorder", "AttentionStore",
    "CrossAttentionBlock", "LayerInfo", "ResidualBlock", "UNet", "UNetConfig",
]
