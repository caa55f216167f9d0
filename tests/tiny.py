"""Tiny random models for fast tests: a CLIP-format tokenizer trained on a few captions, a random
CLIPTextModel of width 32, a tiny U-Net, a cosine v-prediction training schedule, and the summary of
those captions. By default the captions are the shapes grammar's (so layout guidance reads the prompts);
`tiny_pipeline(OWN_CAPTIONS, grammar=None)` is a model of someone's own words."""

import torch
from diffusers import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from conditioning.text_encoder import TextEncoder
from conditioning.tokenizer import train_clip_bpe
from diffusion.pipeline import TextToImagePipeline
from diffusion.vocabulary import CaptionSummary
from unet import UNet, UNetConfig

CAPTIONS = [
    "a red circle", "a blue square above a green triangle", "two yellow circles", "a small purple star",
    "a large orange square on the left", "a red triangle to the right of a blue circle",
] * 3
# A person's own pictures: words of their own, no shapes grammar.
OWN_CAPTIONS = [
    "a polar bear on the ice", "a red apple on a table", "two green apples", "a polar bear above the sea",
    "a brown dog next to a red ball", "a cup of tea on a wooden table",
] * 3


def tiny_text_encoder(hidden_size: int = 32, captions: list[str] = CAPTIONS) -> TextEncoder:
    tokenizer = train_clip_bpe(captions, vocab_size=200, model_max_length=16)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return TextEncoder(CLIPTextModel(config), tokenizer)


def randomize_(module: torch.nn.Module, seed_value: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values: zero-initialised projections would hide bugs."""
    g = torch.Generator().manual_seed(seed_value)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_pipeline(captions: list[str] = CAPTIONS, grammar: str | None = "shapes") -> TextToImagePipeline:
    """A tiny random pipeline whose tokenizer and caption summary come from `captions`."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.preset("tiny"))
    with torch.no_grad():  # a random but well-scaled denoiser: outputs stay finite through sampling
        for name, p in unet.named_parameters():
            if p.abs().sum() == 0 and name.endswith("weight"):
                p.normal_(0, 0.02)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    text_encoder = tiny_text_encoder(captions=captions)
    summary = CaptionSummary.from_captions(captions, grammar, tokenizer=text_encoder.tokenizer)
    return TextToImagePipeline(unet, text_encoder, dict(scheduler.config), captions=summary)
