"""Scheduler names: the short names people type (ddim, euler, dpm++) and the diffusers classes they stand for.

A pipeline lists the schedulers it can run on (`pipe.scheduler.compatibles`); `scheduler_class` picks the one a
name means among them, so that every front end (the CLI's --scheduler, a manifest, a form) reads names alike.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["SCHEDULER_NAMES", "scheduler_class"]

# Short names of common schedulers, each the classes it stands for, the first one the pipeline takes wins (SD's
# Euler is EulerDiscreteScheduler, SD3's and Flux's FlowMatchEulerDiscreteScheduler).
SCHEDULER_NAMES = {
    "ddim": ("DDIMScheduler",), "ddpm": ("DDPMScheduler",), "pndm": ("PNDMScheduler",), "lms": ("LMSDiscreteScheduler",),
    "euler": ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"), "euler-a": ("EulerAncestralDiscreteScheduler",),
    "heun": ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"), "dpm++": ("DPMSolverMultistepScheduler",),
    "unipc": ("UniPCMultistepScheduler",), "deis": ("DEISMultistepScheduler",),
}


def scheduler_class(name: str, compatibles: Iterable[type], *, option: str = "scheduler") -> type:
    """The class among `compatibles` that `name` names: a class name (any case, "Scheduler" optional) or a short
    name of `SCHEDULER_NAMES`.

    Raises a ValueError that names `option` (what the user typed the name into) and lists the choices.

    >>> class DDIMScheduler: ...
    >>> class FlowMatchEulerDiscreteScheduler: ...
    >>> scheduler_class("euler", [DDIMScheduler, FlowMatchEulerDiscreteScheduler]).__name__
    'FlowMatchEulerDiscreteScheduler'
    >>> scheduler_class("DDIM", [DDIMScheduler]).__name__
    'DDIMScheduler'
    """
    by_name = {cls.__name__: cls for cls in compatibles}
    key = name.strip().lower()
    for class_name, cls in by_name.items():
        if key in (class_name.lower(), class_name.lower().removesuffix("scheduler")):
            return cls
    for class_name in SCHEDULER_NAMES.get(key, ()):
        if class_name in by_name:
            return by_name[class_name]
    short = [short for short, names in SCHEDULER_NAMES.items() if any(n in by_name for n in names)]
    raise ValueError(f"{option} {name!r} is not one this model takes; choose one of {', '.join(short)}"
                     f"{' or ' if short else ''}{', '.join(sorted(by_name))}")
