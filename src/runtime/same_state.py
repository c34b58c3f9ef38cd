"""Whether two checkpoint dictionaries would serialise to the same bytes, without serialising them.

A :class:`StateFingerprint` of a checkpoint holds its plain values (with their types: ``1`` and
``1.0`` pickle differently) and its tensors with their autograd version counters, which every
in-place change made by PyTorch's operations raises. Two fingerprints are equal when every plain
value is equal and every pair of tensors has the same layout and is unchanged since its fingerprint
was taken and either is the same memory or, for tensors of at most :data:`CONTENT_BYTES` that span
their whole storage (the fresh copies a ``state_dict`` makes: metric states, random-generator
states), holds the same bytes. Then the two dictionaries serialise to the same bytes. Anything it
cannot vouch for (an object other than plain values and tensors, a sparse or quantized tensor, one
without a version counter, a NaN) makes it unequal to every fingerprint, so the caller serialises.

The fingerprint keeps the tensors it saw alive, so their memory cannot be reused by other tensors
while it exists. Writes through ``Tensor.data`` are not counted by PyTorch's version counter; a
caller compares fingerprints only across saves that nothing but checkpoint bookkeeping separates
(``LastCheckpoint`` right after ``ModelCheckpoint`` at the same step).
"""

from __future__ import annotations

from typing import Any

import torch

from src.runtime.workarounds import tensor_version

CONTENT_BYTES = 1 << 20  # tensors compared by their bytes when they are not the same memory
_PLAIN = (str, int, float, bool, bytes, type(None), torch.dtype, torch.device, torch.Size)


class _Opaque:
    """Stands for something that cannot be vouched for: equal to nothing, itself included."""

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]


class _TensorKey:
    """A tensor, its layout and its version when the fingerprint was taken."""

    def __init__(self, t: torch.Tensor, version: int) -> None:
        self.t, self.version = t, version  # the reference keeps its memory its own
        storage = t.untyped_storage()
        self.ptr, self.nbytes = storage.data_ptr(), storage.nbytes()
        self.layout = (
            self.nbytes,
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
            t.device,
            t.requires_grad,
            t.is_conj(),
            t.is_neg(),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _TensorKey) or self.layout != other.layout:
            return False
        if tensor_version(self.t) != self.version or tensor_version(other.t) != other.version:
            return False  # changed in place since its fingerprint was taken
        if self.ptr == other.ptr:
            return True
        t, o = self.t, other.t
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.nbytes == self.nbytes
        return whole and self.nbytes <= CONTENT_BYTES and torch.equal(_bytes(t), _bytes(o))

    __hash__ = None  # type: ignore[assignment]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as bytes (``-0.0`` and ``0.0`` differ, a NaN equals itself)."""
    return t.detach().reshape(-1).view(torch.uint8)


class StateFingerprint:
    """The fingerprint of ``checkpoint`` at the time it is made (see the module's docstring)."""

    def __init__(self, checkpoint: Any) -> None:
        self.key = _walk(checkpoint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StateFingerprint) and self.key == other.key

    __hash__ = None  # type: ignore[assignment]


def _walk(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        version = tensor_version(obj)
        plain = type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.layout == torch.strided
        if version is None or not plain or obj.is_quantized:
            return _Opaque()
        return _TensorKey(obj, version)
    if isinstance(obj, dict):
        return (dict, tuple((_walk(k), _walk(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (type(obj), tuple(_walk(v) for v in obj))
    if type(obj) in _PLAIN:
        if isinstance(obj, float) and obj != obj:  # NaN: not equal to itself
            return _Opaque()
        return (type(obj), obj)
    return _Opaque()
