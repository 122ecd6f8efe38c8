"""A weight push's file written by every rank at once: each FSDP2 rank writes its own rows of every
tensor into one safetensors file in /dev/shm, so nothing is gathered to rank 0 first.

The gather (`full_state.py`) moves every shard through gloo to rank 0, which then writes the whole
file alone; at the quickstart's size the two took 8 of the 13 ms of a CPU weight export. When every
rank sees the same /dev/shm (one node) the file itself can be the meeting point: the layout of a
safetensors file follows from names, shapes and the dtype alone, which every rank knows, and FSDP2's
dim-0 shard of a row-major tensor is one contiguous run of its bytes. Each rank writes its runs with
`pwrite`, all ranks meet at a barrier, and rank 0 renames the finished file into place.

Used where the one gather is (gloo, CPU shards of one dtype, every DTensor sharded on dim 0) and
all ranks are on one machine; anything else keeps the gather. Tied names (lm_head = embed_tokens) are
written under each name, as `write_weights` stores them. The parameters are listed once: FSDP2 keeps
the same sharded parameters for the life of the model, and a `state_dict()` call per push cost more
than the writes.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from sdpo.learner.full_state import one_gather_works
from sdpo.weight_sync.files import DTYPE_NAMES, encode_header, publish, weights_path


class ShardWriter:
    """Writes one FSDP2 model's pushes; `for_model` says whether it can."""

    def __init__(self, tensors: list[tuple[str, torch.Tensor]], rank: int):
        self.tensors, self.rank = tensors, rank  # the parameters themselves, under every state-dict name
        # where this rank's rows start in each tensor (None: another rank writes it), fixed for the model's life
        self.first_rows = [_first_row(t) if isinstance(t, DTensor) else 0 if rank == 0 else None for _, t in tensors]

    @classmethod
    def for_model(cls, model: torch.nn.Module, rank: int, world_size: int) -> ShardWriter | None:
        """A writer, or None where the gather must do. A collective (every rank must call it, and all
        get the same answer): the ranks compare machines."""
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                machine = (socket.gethostname(), f.read().strip())
        except OSError:
            machine = (socket.gethostname(), "")
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, machine)
        tensors = list(model.state_dict(keep_vars=True).items())  # a tied parameter under each of its names
        if len(set(everyone)) == 1 and one_gather_works([t for _, t in tensors], world_size) \
                and all(t.is_floating_point() and t.dtype in DTYPE_NAMES for _, t in tensors):
            return cls(tensors, rank)
        return None

    def write(self, directory: str, version: int, dtype: torch.dtype | None = None) -> str | None:
        """Write the full state (HF names, cast to `dtype`) to <directory>/weights-v{version}.safetensors;
        every rank must call it. Returns the path on rank 0, None on the others (the file is complete
        and in place when any rank returns)."""
        dtype = dtype or self.tensors[0][1].dtype
        header, total, offsets = _layout(self.tensors, dtype, version)
        os.makedirs(directory, exist_ok=True)
        # every rank opens the same name (rank 0's pid is unknown to the others) and sets the same size;
        # every byte of it is written below, so a stale file left by a failed attempt does not matter
        tmp = os.path.join(directory, f".weights-v{version}.safetensors.partial")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, total)
            if self.rank == 0:
                os.pwrite(fd, header, 0)
            for (_, tensor), first_row, (start, row_bytes) in zip(self.tensors, self.first_rows, offsets):
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                if first_row is not None and local.numel():
                    data = local.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8)
                    os.pwrite(fd, data.numpy(), start + first_row * row_bytes)
        finally:
            os.close(fd)
        dist.barrier()  # every rank's rows are in the file
        if self.rank != 0:
            return None
        path = weights_path(directory, version)
        publish(tmp, path, version)
        return path


def _layout(tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype, version: int) -> tuple[bytes, int, list]:
    """The safetensors header, the file's size, and for each tensor the offset of its first byte in
    the file and the bytes in one of its dim-0 rows."""
    element = torch.empty(0, dtype=dtype).element_size()
    entries, spans, at = {}, [], 0
    for name, tensor in tensors:
        size = tensor.numel() * element
        entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(tensor.shape), "data_offsets": [at, at + size]}
        spans.append((at, size // tensor.shape[0] if tensor.dim() and tensor.shape[0] else size))
        at += size
    header = encode_header(entries, version)
    return header, len(header) + at, [(len(header) + start, row) for start, row in spans]


def _first_row(tensor: DTensor) -> int:
    """The first of this rank's rows of a dim-0-sharded tensor, where FSDP2 placed them."""
    return compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)[1][0]
