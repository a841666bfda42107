"""A preallocated, position-indexed KV cache for many sequences (one *slot* each).

Layout: per layer ``k[l], v[l]``: ``[slots, kv_heads, length, head_dim]``. Sequence ``s``
owns slot ``s``; its committed tokens occupy positions ``0 .. len_s - 1`` (the engine keeps
``len_s``, nothing here does). A forward writes its new tokens' K/V at the positions it is
told and reads ``[:len + new]`` through a mask, so:

- **rollback** is moving a length: entries past it are garbage the mask never shows and
  the next write overwrites;
- **commit** of a verified tree moves only the accepted nodes down to the slots right
  after the root (:meth:`KVCache.move`); for a chain they are already there and nothing
  moves; the prefix never moves.

Worked example — prefix of 3 (positions 0..2), root at 3, tree nodes at 4..7, accepted
path = nodes [1, 3] (positions 5 and 7)::

    moves(base=4, path=[1, 3])  ->  src [5, 7], dst [4, 5]
    after move: position 4 holds what was at 5, position 5 what was at 7; len = 6

Slots stay dense: :meth:`KVCache.free` moves the last used slot into the hole, so the live
slots are always ``0 .. used - 1`` and a batch over all of them reads views, not copies.
Capacity grows on demand (slots and length, by doubling, or at once to what a batch
needs; a copy each time).
"""

from __future__ import annotations

import torch


def moves(base: int, path: list[int]) -> tuple[list[int], list[int]]:
    """Positions to copy (src → dst) so accepted nodes sit right after the root.

    ``base`` is the position of node 0 (root position + 1).

    >>> moves(4, [1, 3])
    ([5, 7], [4, 5])
    >>> moves(4, [0, 1, 2])  # a chain's accepted prefix is already in place
    ([], [])
    """
    src = [base + i for j, i in enumerate(path) if i != j]
    dst = [base + j for j, i in enumerate(path) if i != j]
    return src, dst


class KVCache:
    """Per-layer K/V tensors ``[slots, kv_heads, length, head_dim]`` and slot bookkeeping."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        slots: int = 4,
        length: int = 256,
    ) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.max_length = max_length
        self.dtype, self.device = dtype, torch.device(device)
        self.used = 0  # live slots: 0 .. used - 1
        self.owners: list[object] = []  # owners[s]: who holds slot s (a sequence's state)
        shape = (slots, kv_heads, min(length, max_length), head_dim)
        with torch.inference_mode():  # inference tensors: updated in place, never traced
            self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    @torch.inference_mode()
    def _grow(self, slots: int, length: int) -> None:
        if slots <= self.slots and length <= self.length:
            return
        slots, length = max(slots, self.slots), max(length, self.length)
        shape = (slots, self.kv_heads, length, self.head_dim)
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                new[: t.shape[0], :, : t.shape[2]] = t
                cache[i] = new

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions in every slot."""
        if length > self.max_length:
            raise ValueError(
                f"needs {length} cache positions; the model's context allows {self.max_length}"
            )
        if length > self.length:
            self._grow(self.slots, min(self.max_length, max(length, 2 * self.length)))

    def reserve_slots(self, slots: int) -> None:
        """Make room for ``slots`` live slots at once: one copy when a batch is admitted,
        not one per doubling.

        >>> c = KVCache(1, 1, 2, max_length=8, dtype=torch.float32, slots=2, length=4)
        >>> c.reserve_slots(300); c.slots  # one copy, not seven doublings
        300
        >>> c.reserve_slots(301); c.slots  # a little past capacity: it doubles
        600
        """
        if slots > self.slots:
            self._grow(max(slots, 2 * self.slots), self.length)

    def alloc(self, owner: object = None) -> int:
        """A fresh slot (the next dense one) for ``owner``."""
        if self.used == self.slots:
            self._grow(2 * self.slots, self.length)
        self.used += 1
        self.owners.append(owner)
        return self.used - 1

    @torch.inference_mode()
    def free(self, slot: int) -> object | None:
        """Release ``slot``; the last live slot moves into it and its owner's ``slot``
        attribute is updated. Returns the owner that moved, or ``None``. Only the positions
        the mover's ``cache_extent`` names are copied, where it has one (the rest is garbage
        no mask shows): a whole slot of the zoo target at 256 positions is 4.7 MB.

        >>> c = KVCache(1, 1, 2, max_length=8, dtype=torch.float32, slots=2, length=4)
        >>> class Seq:
        ...     slot, cache_extent = -1, 2
        >>> a, b = Seq(), Seq()
        >>> a.slot, b.slot = c.alloc(a), c.alloc(b)
        >>> with torch.inference_mode():
        ...     c.k[0][1] = 1.0
        >>> c.free(0) is b, b.slot, c.k[0][0, 0, :, 0].tolist()  # 2 of 4 positions moved
        (True, 0, [1.0, 1.0, 0.0, 0.0])
        """
        last = self.used - 1
        self.used -= 1
        moved = self.owners.pop()
        if slot == last:
            return None
        self.owners[slot] = moved
        if hasattr(moved, "slot"):
            moved.slot = slot
        extent = getattr(moved, "cache_extent", None)
        keep = self.length if extent is None else min(int(extent), self.length)
        for cache in (self.k, self.v):
            for t in cache:
                t[slot, :, :keep] = t[last, :, :keep]
        return moved

    @torch.inference_mode()
    def move(self, slots: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy position ``src[i]`` to ``dst[i]`` within slot ``slots[i]``, every layer."""
        if slots.numel() == 0:
            return
        for cache in (self.k, self.v):
            for t in cache:
                t[slots, :, dst] = t[slots, :, src]
