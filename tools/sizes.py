"""Byte counts of torch modules. Works on the meta device: only shapes and dtypes are read."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def tensor_bytes(tensor: "torch.Tensor") -> int:
    return tensor.numel() * tensor.element_size()


def module_bytes(module: "torch.nn.Module", recurse: bool = True) -> int:
    """Parameters plus buffers, each shared tensor counted once (tied embeddings)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def param_count(module: "torch.nn.Module") -> int:
    """Parameters, shared ones once (``Module.parameters`` already deduplicates)."""
    return sum(p.numel() for p in module.parameters())
