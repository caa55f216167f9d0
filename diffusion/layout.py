"""Relation guidance: nudge the noise so the prompt's relations hold, while sampling.

The shipped model draws the objects of "a red circle above a blue square" and looks at them with the
right words, but the pair's order is decided in the first, noisiest steps, where the image cannot say
where anything is yet, and there it follows the starting noise about as often as the words (stage 7:
right 89, inverted 43). The relation loss of training (`diffusion.grounding.relation_loss`: A's word
maps must lie half a cell above B's) can be asked of the sampler instead, as Attend-and-Excite
(Chefer et al., SIGGRAPH 2023) asks its attention loss: at each of the first steps (t ≥ `WINDOW` · T)
take one gradient step on the noisy image,

    x ← x − η · (Δt / T₂₀) · ∇ₓ Σ_images relation_loss(maps of the prompt half at x),

Δt the step's stride and T₂₀ a 20-step stride, so the push does not grow with the number of steps.
It reads only the caption. Prompts without a relation ("a red circle", "two blue squares") are not
touched, and cost nothing. The nudge is taken in the model's input space (after the sampler's
`scale_model_input`), so η means the same for every sampler.

The maps the app shows are still the model's own: the nudge changes the image it denoises, not how
it attends. Measured on the shipped model (evaluate.py's relation prompts of seed 7, 104 images, fp32):
relation held 46 → 102 at η = 50 over the first 3 of 20 steps; 101 at η = 25; η = 200 drew both objects
less often (88). Each guided step costs one more forward and backward pass over the prompt half.

Shapes: B images, C channels, H, W, L tokens, D text width.
"""

from collections.abc import Callable

import torch

from diffusion.grounding import GroundingRecorder, relation_loss, relation_pairs
from unet import UNet

RELATION_GUIDANCE = 50.0  # η, the app's and evaluate.py's default: the step size at 20 sampler steps
WINDOW = 0.85  # guide the steps whose timestep is at least this fraction of the training schedule
REFERENCE_STEPS = 20  # η is the step size at this many sampler steps; other counts scale it by their stride


def relation_guide(unet: UNet, encoding, context: torch.Tensor, mask: torch.Tensor,
                   token_weights: torch.Tensor | None, scheduler, strength: float,
                   num_train_timesteps: int) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The sampling loop's guide for B prompts, or None when none of them has a relation (or strength is 0).

    Args:
        unet: the denoiser, called as unet(x, t, context, mask, token_weights) with grad enabled.
        encoding: the text encoder's EncodedPrompts of the B prompts (words and word ids find the relations).
        context: (B, L, D), mask (B, L), token_weights (B, L) or None: the prompt half of the guided batch.
        scheduler: the sampling scheduler, after set_timesteps (its timesteps, its input scaling).
        strength: η ≥ 0.  num_train_timesteps: T of the training schedule.
    Returns:
        guide(step, t, x (B, C, H, W)) → the nudged x, or x itself outside the window.
    """
    if not strength >= 0:  # NaN too
        raise ValueError(f"relation_guidance must be >= 0 (0 turns it off), got {strength}.")
    if strength == 0:
        return None
    # Inputs of a call under inference_mode are inference tensors: autograd needs ordinary ones.
    with torch.inference_mode(False):
        pairs = relation_pairs(encoding, context.shape[1])
        if len(pairs[2]) == 0:
            return None
        context, mask = context.clone(), mask.clone()
        token_weights = None if token_weights is None else token_weights.clone()
    timesteps = [int(t) for t in scheduler.timesteps]
    stride = num_train_timesteps / REFERENCE_STEPS
    scales = {i: strength * (t - (timesteps[i + 1] if i + 1 < len(timesteps) else 0)) / stride
              for i, t in enumerate(timesteps) if t >= WINDOW * num_train_timesteps}

    def guide(step: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if step not in scales:
            return x
        with torch.inference_mode(False), torch.enable_grad():
            x_in = scheduler.scale_model_input(x.clone(), t).detach().requires_grad_(True)  # (B, C, H, W)
            recorder = GroundingRecorder()
            with unet.record_attention(recorder):
                unet(x_in.to(context.dtype), torch.full((x.shape[0],), int(t), device=x.device),
                     context, mask, token_weights)
            # relation_loss averages over relations; × B gives every image the gradient of its own loss.
            (grad,) = torch.autograd.grad(relation_loss(recorder.maps, pairs) * x.shape[0], x_in)
        input_scale = float(scheduler.scale_model_input(torch.ones(1, device=x.device), t))  # x_in = s · x
        return x - scales[step] * grad.to(x.dtype) / input_scale

    return guide
