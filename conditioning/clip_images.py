"""Pictures as CLIP's image tower reads them: uint8 batches (as data.loading.load_pairs holds a split in memory)
normalised to CLIP's mean/std, and the zoom-out augmentation for drawings on white. No torchvision.

Shapes: B images, S image size.
"""

import torch

# OpenAI CLIP's normalisation constants (also written into preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def zoom_out_on_white(pixels: torch.Tensor, generator: torch.Generator, min_scale: float = 0.75,
                      flip: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, S, S) uint8 pictures on white, each shrunk by a random factor in [min_scale, 1] and pasted at a
    random place on a white square, and mirrored where `flip` (B,) bool allows it (with probability 1/2).

    For clip art (one drawing on white): the whole drawing stays in view, so its caption stays true; a
    mirror is only allowed where no caption says "left" or "right". Draws come from `generator` only,
    so a run that seeds it per step reads the same pictures after a resume.
    """
    b, _, size, _ = pixels.shape
    scales = torch.empty(b).uniform_(min_scale, 1.0, generator=generator).tolist()
    corners = torch.rand(b, 2, generator=generator).tolist()
    mirror = torch.rand(b, generator=generator) < 0.5
    if flip is not None:
        mirror &= flip
    out = torch.full_like(pixels, 255)
    for i, (scale, (fy, fx)) in enumerate(zip(scales, corners, strict=True)):
        side = max(1, round(size * scale))
        small = torch.nn.functional.interpolate(pixels[i : i + 1].float(), size=(side, side), mode="bilinear",
                                                antialias=True, align_corners=False)  # (1, 3, side, side)
        top, left = round(fy * (size - side)), round(fx * (size - side))
        out[i, :, top : top + side, left : left + side] = small[0].round().clamp(0, 255).to(torch.uint8)
        if mirror[i]:
            out[i] = out[i].flip(-1)
    return out


def to_pixel_values(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float, normalised with CLIP's mean/std (what CLIPModel's vision tower expects)."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std
