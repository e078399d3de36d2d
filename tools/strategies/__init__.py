"""Memory and speed strategies, one module each: what a strategy does to memory, the rules it must
obey, and the code that applies it to a pipeline.

- ``quantize``: bitsandbytes nf4 / int8 and torchao int8 / fp8 weight-only, which layers each converts.
- ``layerwise_casting``: fp8 storage of diffusers models' weights, upcast per layer.
- ``offload``: where the pipeline lives: all on the device, model CPU offload, sequential offload.
- ``group_offload``: the groups diffusers' group offloading really makes.
- ``vae``: VAE tiling and slicing.
- ``torch_compile``: regional (repeated blocks) or full torch.compile of the denoiser.
- ``attention``: the attention backend of the denoiser.

Each module declares ``RULES`` (see ``tools.plan.Rule``) and an ``apply`` function returning ``Code``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    """Where applied code lands in a script: source expressions for the pipeline and its settings."""

    pipe: str = "pipe"
    device: str = '"cuda"'
    dtype: str = "torch.bfloat16"
    denoiser: str = "transformer"

    @property
    def device_is_default_cuda(self) -> bool:
        return self.device in ('"cuda"', "'cuda'")


@dataclass(frozen=True)
class Code:
    """Source applying one strategy: statements run once the pipeline exists, the imports they use,
    and the edit in words for the person reviewing the change."""

    statements: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    edit: str = ""
