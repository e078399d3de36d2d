"""The attention backend of the denoiser (``ModelMixin.set_attention_backend``).

There is no pipeline-level setter in diffusers 0.42; the model's method also changes the process's
default. Backends other than the native ones need their package (flash-attn, sageattention,
xformers). UNet models' attention processors do not dispatch, so the setting changes nothing there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..facts import library_fact
from ..plan import Rule
from . import Code

if TYPE_CHECKING:
    from ..plan import Plan, Target
    from . import Site

# backend name prefix -> the distribution that provides its kernels
PACKAGE_OF_BACKEND = {"flash": "flash-attn", "_flash_3": "flash-attn-3", "sage": "sageattention", "xformers": "xformers"}


def backend_names() -> set[str]:
    """Every name diffusers accepts."""
    return set(_backend_names())


@library_fact
def _backend_names() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return sorted(member.value for member in AttentionBackendName)


def _package_for(backend: str) -> str | None:
    if backend.endswith("_hub"):  # kernels fetched from the Hub at run time
        return None
    for prefix, package in PACKAGE_OF_BACKEND.items():
        if backend == prefix or backend.startswith(prefix + "_"):
            return package
    return None


def _missing_package(plan: "Plan", target: "Target") -> str | None:
    package = _package_for(plan.attention_backend or "")
    if package is None or target.versions is None or package not in target.versions:
        return None
    return None if target.versions[package] else f"{plan.attention_backend} ({package})"


def fastest_backend(profile, target: "Target") -> str | None:
    """The attention backend measured fastest on this GPU (``profile.attention_speed``), if it beats
    PyTorch's own choice and its package is installed; None for UNet denoisers (no dispatch)."""
    if target.denoiser == "unet":
        return None
    faster = {name: speed for name, speed in profile.attention_speed.items() if speed > 1.0 and name != "native"}
    usable = [n for n in faster if _package_for(n) is None or (target.versions or {}).get(_package_for(n))]
    return max(usable, key=faster.get, default=None)


RULES = (
    Rule(
        "attention.known_backend",
        lambda plan, target: plan.attention_backend
        if plan.attention_backend and plan.attention_backend not in backend_names()
        else None,
        "'{0}' is not an attention backend diffusers knows.",
        "Use one of diffusers.AttentionBackendName, e.g. native, flash, sage, xformers.",
    ),
    Rule(
        "attention.backend_needs_package",
        _missing_package,
        "The attention backend {0} is not installed.",
        "Install it or leave attention_backend null.",
    ),
    Rule(
        "attention.unet_ignores_backend",
        lambda plan, target: "unet" if plan.attention_backend and target.denoiser == "unet" else None,
        "UNet attention processors do not dispatch to attention backends: setting one on the {0} changes nothing.",
        "Leave attention_backend null for UNet pipelines.",
        severity="warning",
    ),
)


def apply(plan: "Plan", site: "Site") -> Code:
    """``pipe.<denoiser>.set_attention_backend(name)``."""
    if not plan.attention_backend:
        return Code()
    return Code(
        (f'{site.pipe}.{site.denoiser}.set_attention_backend("{plan.attention_backend}")',),
        (),
        f"{plan.attention_backend} attention",
    )
