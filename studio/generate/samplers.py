"""webUI sampler names -> diffusers schedulers.

The names are A1111's. Since A1111 1.9 the noise schedule is a separate "Schedule type"
(``Sampler: DPM++ 2M, Schedule type: Karras``); older versions and Civitai write one name
(``DPM++ 2M Karras``). ``normalize`` accepts both; the studio's own name is the one-word form.
"""

from __future__ import annotations

from studio.errors import StudioError

# name -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                             "use_karras_sigmas": True}),
    "DPM++ 2S a": ("DPMSolverSinglestepScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
DEFAULT = "Euler a"
# config keys a scheduler copied from another one must not inherit
_RESET = ("use_karras_sigmas", "algorithm_type", "skip_prk_steps")


def names() -> list[str]:
    return list(SAMPLERS)


def normalize(name: str, schedule: str | None = None) -> str:
    """``("DPM++ 2M", "Karras")`` or ``"dpm++ 2m karras"`` -> ``"DPM++ 2M Karras"``."""
    key = " ".join(str(name).split())
    if schedule and schedule.lower() not in ("automatic", "normal", "") and not key.lower().endswith(schedule.lower()):
        key = f"{key} {schedule}"
    for known in SAMPLERS:
        if known.lower() == key.lower():
            return known
    raise StudioError(f"Unknown sampler {name!r}{f' with schedule {schedule!r}' if schedule else ''}.",
                      f"Use one of: {', '.join(SAMPLERS)}.")


def split_schedule(name: str) -> tuple[str, str | None]:
    """``"DPM++ 2M Karras"`` -> ``("DPM++ 2M", "Karras")`` (A1111 >= 1.9 writes them apart)."""
    name = normalize(name)
    if name.endswith(" Karras"):
        return name[: -len(" Karras")], "Karras"
    return name, None


def make_scheduler(name: str, base_config):
    """A new scheduler for ``name`` built from the pipeline's own scheduler config (betas, offsets,
    prediction type), so v-prediction and SDXL models keep their settings."""
    import diffusers

    cls_name, extra = SAMPLERS[normalize(name)]
    cls = getattr(diffusers, cls_name)
    config = {k: v for k, v in dict(base_config).items() if k not in _RESET}
    config.update(extra)
    return cls.from_config(config)
