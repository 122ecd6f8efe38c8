"""Packing named tensors into flat byte buckets and back: the unit every bucketed transport moves.

A bucket is one contiguous uint8 buffer holding several tensors back to back (each aligned), plus
the list of (name, dtype, shape) that says how to cut it. Tensors go in the order the model yields
them (embeddings, layer 0, layer 1, ...), so a receiver that loads bucket by bucket finishes whole
layers early and a transfer holds at most one or two buckets of extra memory, never a model copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

ALIGN_BYTES = 16  # every tensor starts at a multiple of this: any dtype view of the bytes is legal

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
              torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)
}


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # "float32", "bfloat16", ...: plain strings so that metadata travels as JSON / Ray args
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=dtype_of(self.dtype)).element_size()

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape)]

    @staticmethod
    def from_json(item: list) -> "TensorMeta":
        return TensorMeta(item[0], item[1], tuple(item[2]))


def dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"cannot move tensors of dtype {name!r} in a weight bucket; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


def meta_of(name: str, tensor: torch.Tensor) -> TensorMeta:
    return TensorMeta(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN_BYTES) * ALIGN_BYTES


def bucket_nbytes(metas: list[TensorMeta]) -> int:
    end = 0
    for m in metas:
        end = _aligned(end) + m.nbytes
    return end


def plan_buckets(metas: Iterable[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Split tensors, in order, into buckets of at most `bucket_bytes` each; a tensor larger than
    that travels alone in a bucket of its own size."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[TensorMeta]] = [[]]
    for m in metas:
        if buckets[-1] and bucket_nbytes(buckets[-1] + [m]) > bucket_bytes:
            buckets.append([])
        buckets[-1].append(m)
    return [b for b in buckets if b]


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of (name, tensor) into buckets of at most `bucket_bytes` (one oversized tensor
    alone), without materialising more than one bucket: the source may gather each tensor lazily."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and _aligned(size) + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        size = _aligned(size) + nbytes
        bucket.append((name, tensor))
    if bucket:
        yield bucket


def pack(named_tensors: list[tuple[str, torch.Tensor]], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[TensorMeta]]:
    """Copy the tensors into one uint8 buffer (`out` if given and large enough, on its device;
    else a new buffer on the first tensor's device). Returns the filled prefix and the metadata."""
    metas = [meta_of(name, t) for name, t in named_tensors]
    total = bucket_nbytes(metas)
    if out is None or out.numel() < total:
        device = named_tensors[0][1].device if named_tensors else torch.device("cpu")
        out = torch.empty(total, dtype=torch.uint8, device=device)
    offset = 0
    for (_, tensor), m in zip(named_tensors, metas):
        offset = _aligned(offset)
        out[offset : offset + m.nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        offset += m.nbytes
    return out[:total], metas


def unpack(flat: torch.Tensor, metas: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (no copies), one per tensor: valid as long as `flat` is."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"a bucket is a flat uint8 tensor, got {flat.dtype} of shape {tuple(flat.shape)}")
    need = bucket_nbytes(metas)
    if flat.numel() < need:
        raise ValueError(f"bucket holds {flat.numel()} bytes but its metadata needs {need}")
    out, offset = [], 0
    for m in metas:
        offset = _aligned(offset)
        out.append((m.name, flat[offset : offset + m.nbytes].view(dtype_of(m.dtype)).view(m.shape)))
        offset += m.nbytes
    return out
