"""The shipped weights load offline and work (catches a broken, swapped or missing file)."""

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel

from conditioning.imagefolder import to_pixel_values
from conditioning.text_encoder import TextEncoder
from data.shapes import ShapesConfig, make_example

DEFAULT = Path(__file__).resolve().parent.parent / "weights" / "default"


def test_text_encoder_loads_offline_and_knows_the_shapes_words():
    enc = TextEncoder.from_pretrained(str(DEFAULT))
    assert enc.hidden_size == 256 and enc.max_length == 32
    out = enc.encode(["two small red circles to the left of a blue square", "a crème brûlée"])
    assert out.context.shape[0] == 2 and out.context.shape[2] == 256
    assert out.tokens[0][1:-1] == "two small red circles to the left of a blue square".split()  # one token a word
    assert out.unknown_words == [[], ["crème", "brûlée"]]


def test_shipped_clip_matches_captions_to_their_images():
    clip = CLIPModel.from_pretrained(DEFAULT / "clip").eval()
    enc = TextEncoder.from_pretrained(str(DEFAULT))
    config = ShapesConfig(size=32, seed=123)  # a seed the CLIP never trained on
    examples = [make_example(config, "test", i) for i in range(16)]
    texts = [row["text"] for _, row in examples]
    pixels = to_pixel_values(torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _ in examples]))
    ids = enc.tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = clip(**ids, pixel_values=pixels).logits_per_text  # (16 texts, 16 images)
    top1 = logits.argmax(dim=1)
    # Distinct scenes among 16: a working CLIP gets most right; a broken or random one about 1/16.
    assert (top1 == torch.arange(16)).float().mean() >= 0.6
    # The pipeline's text encoder is the same text tower as the CLIP's.
    for name, p in enc.model.named_parameters():
        torch.testing.assert_close(p, dict(clip.text_model.named_parameters())[name.removeprefix("text_model.")])
