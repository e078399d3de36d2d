"""Group offloading (``diffusers.hooks.apply_group_offloading``): what moves to the GPU at once.

The grouping mirrors diffusers 0.42's ``_apply_group_offloading_block_level``: only the DIRECT
children of a model that are ``ModuleList``/``Sequential`` (or named in ``_group_offload_block_modules``)
become block groups; every other parameter of the model forms one root group. A CLIP or T5 text
encoder has no top-level ModuleList, so block-level offloading moves it whole. Leaf level hooks each
Conv/Linear/Embedding. tests/test_strategies.py checks this against the hooks diffusers installs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..sizes import module_bytes

if TYPE_CHECKING:
    import torch


def block_level_groups(module: "torch.nn.Module", num_blocks_per_group: int = 1) -> list[int]:
    """Bytes of each group block-level offloading makes, in execution order, the root group last."""
    import torch

    block_modules = set(getattr(module, "_group_offload_block_modules", None) or [])

    def groups_of(mod: "torch.nn.Module") -> list[int]:
        groups: list[int] = []
        grouped = 0
        for name, child in mod.named_children():
            if name in block_modules:
                nested = groups_of(child)
                groups += nested
                grouped += module_bytes(child)
            elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
                blocks = list(child)
                for start in range(0, len(blocks), num_blocks_per_group):
                    chunk = blocks[start : start + num_blocks_per_group]
                    size = sum(module_bytes(b) for b in chunk)
                    groups.append(size)
                    grouped += size
        root = module_bytes(mod) - grouped
        if root > 0:
            groups.append(root)
        return groups

    return groups_of(module)


def largest_leaf_bytes(module: "torch.nn.Module") -> int:
    """Largest single layer leaf-level offloading moves (Conv*/Linear/Embedding, own weights only)."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    sizes = [module_bytes(m, recurse=False) for m in module.modules() if isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS)]
    return max(sizes, default=0)
