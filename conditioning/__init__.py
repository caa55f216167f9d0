"""Text conditioning: the frozen CLIP text encoder, its tokenizer, and CLIP's view of pictures (the trainer is
the top-level pretrain_clip.py)."""
