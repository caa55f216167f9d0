"""Text conditioning: the frozen CLIP text encoder and the small CLIP's pre-training (see pretrain_clip)."""

from conditioning.text_encoder import EncodedPrompts, TextEncoder

__all__ = ["EncodedPrompts", "TextEncoder"]
