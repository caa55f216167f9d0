"""Samplers (diffusers schedulers), classifier-free guidance, and the sampling loop.

Shapes: B images, C channels, H, W, L tokens, D text width.

The noise schedules and update rules are diffusers' (they cite their equations); what is ours is
choosing their settings so each sampler works with the schedule the model was trained on, and one
small loop (k-diffusion's `sample_euler` shape) with a callback that drives progress bars and tells
the attention recorder which step is running.
"""

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# Sampler name → (scheduler class, settings on top of the training scheduler's config).
# "trailing" spacing starts every sampler at the last training step (t = T−1), where the initial pure
# noise is right; "leading" (DDIM's default) would start at t = 900 of 1000 with the wrong noise level.
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}
DEFAULT_SAMPLER = "dpm++"


def make_scheduler(train_config: dict, sampler: str) -> SchedulerMixin:
    """A sampling scheduler of kind `sampler` for a model trained with the scheduler `train_config`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}.")
    cls, settings = SAMPLERS[sampler]
    settings = {**settings, "timestep_spacing": "trailing"}
    if cls is DPMSolverMultistepScheduler and train_config.get("beta_schedule") == "squaredcos_cap_v2":
        # The cosine schedule's last steps have alpha_bar ≈ 0; DPM-Solver's log-SNR steps explode there
        # unless lambda is clipped (diffusers: "critical for cosine"; -5.1 as in their docs).
        settings["lambda_min_clipped"] = -5.1
    return cls.from_config(dict(train_config), **settings)


def guided_model(
    unet: Callable, context: torch.Tensor, mask: torch.Tensor, scale: float, token_weights: torch.Tensor | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Classifier-free guidance as a wrapper: one batched forward over [unconditional; conditional].

    Args:
        unet: the denoiser, called as unet(x, t, context, mask, token_weights) on the doubled batch.
        context: (2B, L, D), the B negative (or empty) prompts first, then the B prompts, in the U-Net's
            compute type (x is cast to it; the prediction comes back in x's type, e.g. fp32 for the scheduler).
        mask: (2B, L) bool.  scale: guidance scale s (1 = no guidance).
        token_weights: (2B, L) or None (emphasis; the pipeline leaves the negative half at 1).
    Returns:
        fn(x (B, C, H, W), t) → uncond + s·(cond − uncond), (B, C, H, W).
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = x.to(context.dtype)  # in the U-Net's compute type
        t_in = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        out = unet(torch.cat([x_in, x_in]), t_in.repeat(2), context, mask, token_weights)  # (2B, C, H, W)
        uncond, cond = out.to(x.dtype).chunk(2)
        return uncond + scale * (cond - uncond)

    return fn


def sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    guide: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run `scheduler` from `noise` (unit Gaussian, (B, C, H, W)) to images.

    `scheduler.set_timesteps` must have been called. callback(step, timestep) runs before each model
    call: progress bars use it, and so does the attention recorder (the step index it sets is the key
    maps are filed under). guide(step, t, x) → x, if given, may move x before the model sees it
    (layout guidance, diffusion/layout.py).
    """
    x = noise * scheduler.init_noise_sigma  # Euler's sigma-space starts at sigma_max, the others at 1
    for step, t in enumerate(scheduler.timesteps):
        if callback is not None:
            callback(step, int(t))
        if guide is not None:
            x = guide(step, t, x)
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
