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


def pinned_bytes(module: "torch.nn.Module") -> int:
    """Host bytes of a pinned copy of each parameter and buffer: PyTorch's caching host allocator gives
    every ``pin_memory()`` a block rounded up to a power of two (what group offloading with streams pins)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen and (size := tensor_bytes(tensor)):
            seen.add(id(tensor))
            total += 1 << (size - 1).bit_length()
    return total


def param_count(module: "torch.nn.Module") -> int:
    """Parameters, shared ones once (``Module.parameters`` already deduplicates)."""
    return sum(p.numel() for p in module.parameters())


def loaded_bytes(module: "torch.nn.Module") -> int:
    """Bytes the tensors of a loaded ``module`` hold, quantization state included, each storage once.

    Unlike :func:`module_bytes` this sees what quantized layers really keep: torchao tensor subclasses
    are counted by their inner tensors, bitsandbytes weights with their quantization state (nf4
    absmax and code table, int8 row scales). Use it on modules whose tensors hold data (not meta).
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen: set[tuple[str, int, int]] = set()
    total = 0

    def add(tensor: "torch.Tensor") -> None:
        nonlocal total
        if is_traceable_wrapper_subclass(tensor):
            inner, _ = tensor.__tensor_flatten__()
            for name in inner:
                add(getattr(tensor, name))
            return
        key = (str(tensor.device), tensor.data_ptr(), tensor_bytes(tensor))
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(tensor)

    for tensor in (*module.parameters(), *module.buffers()):
        add(tensor)
        for state_tensor in _bnb_state_tensors(tensor):
            add(state_tensor)
    return total


def _bnb_state_tensors(tensor: "torch.Tensor"):
    import torch

    state = getattr(tensor, "quant_state", None)  # bnb Params4bit; state2 when statistics are compressed
    while state is not None:
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if isinstance(value, torch.Tensor):
                yield value
        state = getattr(state, "state2", None)
    scale = getattr(tensor, "SCB", None)  # bnb Int8Params row scales
    if isinstance(scale, torch.Tensor):
        yield scale
