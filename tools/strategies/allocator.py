"""PyTorch's CUDA allocator: expandable segments, set before torch starts, and the model of what the
caching allocator reserves (below: ``CachingAllocator``, ``pool_reserved``).

With ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` the caching allocator grows segments in
place instead of keeping freed blocks of every size it saw, so reserved memory stays near allocated
(measured on the H200: driver-level peaks 10-32% lower, reserved within 0.02-1.5 GB of allocated).
That makes the peak predictable, so plans default to it. The variable is read once, when CUDA
starts, so it must be set before the script imports torch; ``os.environ.setdefault`` keeps a value
the user set. It applies to CUDA (Linux and Windows builds that support it); MPS and ROCm have
their own allocators, and there recommend's figures use the default allocator's terms.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..dryrun import Trace
    from ..plan import Plan

VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"
SETTING = "expandable_segments:True"

RULES = ()


def environment(plan: "Plan") -> tuple[str, ...]:
    """Lines that must run before torch is imported."""
    if plan.allocator != "expandable_segments":
        return ()
    return (f'os.environ.setdefault("{VARIABLE}", "{SETTING}")',)


def edit(plan: "Plan") -> str:
    return f"set {VARIABLE}={SETTING} before torch is imported (setdefault: a value you set wins)"


# ---------------------------------------------------------------- the allocator's memory model
#
# PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp; the sizes are c10/core/
# AllocatorConfig.h's), replayed on the dry run's allocations (Trace.allocations): what it reserves is
# what the driver sees, so the peak is derived from the run's own allocation order instead of a share
# of the working memory. The rules it follows:
# - sizes round up to 512 bytes; up to 1 MiB is the small pool, above it the large pool; blocks are
#   reused only by requests of their own pool (and stream), the smallest free block that fits first;
# - default allocator: a request no free block fits gets a new segment: 2 MiB (small), 20 MiB (up to
#   10 MiB), else the size rounded up to 2 MiB; a block is split when more than 1 MiB is left (small:
#   512 bytes); freed blocks merge with free neighbours of their segment, never across segments;
# - expandable segments: one segment per pool that grows at its end in 2 MiB (small) or 20 MiB pages,
#   taking in a free block at its end, which best fit ranks by the size it can grow to (so any other free
#   block that fits is taken first); any remainder of 512 bytes or more is split off;
# - empty_cache (accelerate's model offload calls it when it moves a model back): whole free segments
#   are given back (default); free pages are unmapped (expandable: the space stays a gap).

_MIN_BLOCK = 512
_SMALL_SIZE = 1 << 20
_SMALL_BUFFER = 2 << 20
_LARGE_BUFFER = 20 << 20
_MIN_LARGE_ALLOC = 10 << 20
_ROUND_LARGE = 2 << 20


class _Block:
    __slots__ = ("address", "free", "next", "prev", "size", "small")

    def __init__(self, address: int, size: int, small: bool):
        self.address, self.size, self.small, self.free = address, size, small, True
        self.prev: _Block | None = None
        self.next: _Block | None = None


class CachingAllocator:
    """PyTorch's CUDA caching allocator on one stream, as far as reserved memory goes (the rules above)."""

    def __init__(self, expandable: bool):
        self.expandable = expandable
        self.reserved = self.peak_reserved = self.allocated = 0
        self._free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # pool -> sorted (size, address)
        self._blocks: dict[int, _Block] = {}  # free blocks by address
        self._tail: dict[bool, _Block | None] = {True: None, False: None}  # expandable: each segment's last block
        self._next_address = 0

    def malloc(self, size: int) -> _Block:
        size = max(_MIN_BLOCK, -(-size // _MIN_BLOCK) * _MIN_BLOCK)
        small = size <= _SMALL_SIZE
        pool = self._free[small]
        i = bisect_left(pool, (size, -1))
        if self.expandable and i + 1 < len(pool) and self._blocks[pool[i][1]] is self._tail[small]:
            i += 1  # best fit counts the segment's free end as the size it can grow to: any other block first
        if i < len(pool):
            block = self._blocks.pop(pool.pop(i)[1])
        else:
            block = self._grow(small, size)
        block.free = False
        left = block.size - size
        if left >= _MIN_BLOCK if (small or self.expandable) else left > _SMALL_SIZE:
            rest = _Block(block.address + size, left, small)
            rest.prev, rest.next, block.size = block, block.next, size
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            if self._tail[small] is block:
                self._tail[small] = rest
            self._keep(rest)
        self.allocated += block.size
        return block

    def free(self, block: _Block) -> None:
        block.free = True
        self.allocated -= block.size
        for other in (block.prev, block.next):
            if other is not None and other.free:
                self._take(other)
                if other is block.prev:
                    block.address, block.prev = other.address, other.prev
                    if other.prev is not None:
                        other.prev.next = block
                else:
                    block.next = other.next
                    if other.next is not None:
                        other.next.prev = block
                block.size += other.size
                if self._tail[block.small] is other:
                    self._tail[block.small] = block
        self._keep(block)

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``: free segments back to the driver (default), free pages unmapped (expandable)."""
        for small, pool in self._free.items():
            kept = []
            for size, address in pool:
                block = self._blocks[address]
                if self.expandable or (block.prev is None and block.next is None):
                    self.reserved -= size
                    del self._blocks[address]
                    block.free = False  # a gap: nothing merges into it, nothing is placed there
                else:
                    kept.append((size, address))
            self._free[small] = kept

    def _grow(self, small: bool, size: int) -> _Block:
        if not self.expandable:
            segment = _SMALL_BUFFER if small else _LARGE_BUFFER if size < _MIN_LARGE_ALLOC else -(-size // _ROUND_LARGE) * _ROUND_LARGE
            block = _Block(self._next_address, segment, small)
            self._next_address += segment
            self._add_reserved(segment)
            return block
        page = _SMALL_BUFFER if small else _LARGE_BUFFER
        tail = self._tail[small]
        if tail is not None and tail.free:  # the segment's free end grows to fit
            self._take(tail)
            grown = -(-(size - tail.size) // page) * page
            tail.size += grown
            self._add_reserved(grown)
            return tail
        grown = -(-size // page) * page
        block = _Block(tail.address + tail.size if tail is not None else self._new_address(), grown, small)
        block.prev = tail
        if tail is not None:
            tail.next = block
        self._tail[small] = block
        self._add_reserved(grown)
        return block

    def _new_address(self) -> int:
        self._next_address += 1 << 50  # a segment's own address space
        return self._next_address

    def _add_reserved(self, size: int) -> None:
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _keep(self, block: _Block) -> None:
        insort(self._free[block.small], (block.size, block.address))
        self._blocks[block.address] = block

    def _take(self, block: _Block) -> None:
        pool = self._free[block.small]
        del pool[bisect_left(pool, (block.size, block.address))]
        del self._blocks[block.address]


def pool_reserved(trace: "Trace", plan: "Plan", workspace_per_byte: dict[str, float], emptied: frozenset[int],
                  onloads: dict[int, list[int]] | None = None, dequantized: frozenset[str] = frozenset()) -> list[int]:  # fmt: skip
    """What the allocator has reserved for the run's own tensors at the end of each call of ``trace``: the dry
    run's allocations replayed under ``plan.allocator``, with cuDNN's workspace beside each convolution
    (``workspace_per_byte`` by kind, the GPU's), the cache emptied before the calls in ``emptied``, the weight
    tensors in ``onloads`` (by call: the placement's) allocated as the call starts and freed as it ends, and in
    the calls of the components in ``dequantized`` a full-precision copy of each weight a matmul reads, made and
    freed around it. Freed blocks an earlier call left are in it: reserved memory only grows between empties."""
    allocator = CachingAllocator(expandable=plan.allocator == "expandable_segments")
    events, blocks = trace.allocations, []
    transients: dict[int, list[int]] = {}  # position -> sizes allocated and freed there, in order
    for at, kind, size in trace.workspaces:
        per_byte = workspace_per_byte.get(kind, workspace_per_byte.get(kind.split("_")[0], 0.0))
        if per_byte:
            transients.setdefault(at, []).append(int(per_byte * size))
    if dequantized:
        spans = [call.events for call in trace.calls if call.events and call.component in dequantized]
        for at, size in trace.weight_uses:
            if any(start <= at < end for start, end in spans):
                transients.setdefault(at, []).append(size)
    position, out = 0, []
    for index, call in enumerate(trace.calls):
        if call.events is None:
            out.append(allocator.reserved)
            continue
        if index in emptied:
            allocator.empty_cache()
        weights = [allocator.malloc(size) for size in (onloads or {}).get(index, ())]
        for at in range(position, call.events[1]):
            for size in transients.get(at, ()):
                allocator.free(allocator.malloc(size))
            event = events[at]
            if event > 0:
                blocks.append(allocator.malloc(event))
            else:
                allocator.free(blocks[-event - 1])
        position = call.events[1]
        out.append(allocator.reserved)
        for block in weights:
            allocator.free(block)
    return out


_REPLAYED: dict[str, list[int]] = {}  # this process's replays, by cached_pool_reserved's key
_STREAMS: dict[int, tuple["Trace", bytes]] = {}  # the latest traces' stream digests, by id (the trace kept alive)


def _stream_digest(trace: "Trace") -> bytes:
    """A digest of what a replay reads from the trace (its allocations, workspaces, weight uses and call
    spans): computed once per trace, not once per variant (tens of thousands of integers each time)."""
    import hashlib
    import json
    from array import array

    known = _STREAMS.get(id(trace))
    if known is not None and known[0] is trace:
        return known[1]
    digest = hashlib.sha256(array("q", trace.allocations).tobytes())
    digest.update(json.dumps([trace.workspaces, trace.weight_uses, [c.events for c in trace.calls]]).encode())
    if len(_STREAMS) >= 8:  # a server plans for a few models at a time
        _STREAMS.pop(next(iter(_STREAMS)))
    _STREAMS[id(trace)] = (trace, digest.digest())
    return _STREAMS[id(trace)][1]


def cached_pool_reserved(trace: "Trace", plan: "Plan", workspace_per_byte: dict[str, float], emptied: frozenset[int],
                         onloads: dict[int, list[int]], dequantized: frozenset[str]) -> list[int]:  # fmt: skip
    """``pool_reserved``, kept per trace and arguments in this process and on disk beside the traces (a
    recommendation replays a few tens of variants of a run of tens of thousands of allocations)."""
    import hashlib
    import json

    from ..measure import cache_dir

    digest = hashlib.sha256(_stream_digest(trace))
    digest.update(json.dumps([plan.allocator, sorted(workspace_per_byte.items()), sorted(emptied),
                              sorted(onloads.items()), sorted(dequantized)]).encode())  # fmt: skip
    key = digest.hexdigest()[:32]
    if key in _REPLAYED:
        return _REPLAYED[key]
    path = cache_dir() / "replay" / f"{key}.json"
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        out = pool_reserved(trace, plan, workspace_per_byte, emptied, onloads, dequantized)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out))
        except OSError:
            pass  # a read-only cache: replay again next time
    _REPLAYED[key] = out
    return out


def weights_reserved_per_byte(trace: "Trace", plan: "Plan") -> float:
    """What the allocator reserves per byte of the weights it holds: each component's parameters and buffers
    allocated one by one into fresh segments (the default allocator rounds each large one up to 2 MiB and packs
    those under 10 MiB into 20 MiB segments; expandable segments pack them all, which is 1.0)."""
    if plan.allocator == "expandable_segments" or not trace.weight_tensors:
        return 1.0
    reserved = total = 0
    for sizes in trace.weight_tensors.values():
        allocator = CachingAllocator(expandable=False)
        for size in sizes:
            allocator.malloc(size)
        reserved, total = reserved + allocator.reserved, total + sum(sizes)
    return reserved / total if total else 1.0
