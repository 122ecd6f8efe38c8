"""The whole weights of an FSDP2 model on rank 0, for a weight push: one gather for all tensors.

torch's `get_model_state_dict(full_state_dict=True)` gathers tensor by tensor, one collective per
parameter. On CPU over gloo each costs a round trip whatever its size, so a 0.6M-parameter model
spent tens of ms of a ~450 ms quickstart step there (benchmarks/RESULTS.md, "Weight sync as a share of the step"). Here
every rank packs its shards into one flat buffer and rank 0 receives them all in one `gather`, then
cuts the buffers back into tensors. One rank: the shards are the tensors, nothing moves.

FSDP2 shards each parameter on dim 0 as `torch.chunk` does (rank r holds rows [r*c, (r+1)*c) with
c = ceil(rows / world_size); the last ranks may hold fewer or none), so every rank knows what every
other holds without asking. Anything else (another placement, mixed dtypes) falls back to torch's
per-tensor gather, as GPU shards do: there one gather would hold the whole model in rank 0's device
memory at once, where torch's moves each tensor to host memory as it comes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor, Shard


def local_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named full tensors of a one-rank FSDP2 model (DTensor shards are whole), detached, on CPU.
    Tied parameters appear under each of their names, as `get_model_state_dict` gives them."""
    state = {}
    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        state[name] = local.detach().to("cpu")
    return state


def full_state(model: torch.nn.Module, rank: int, world_size: int) -> dict[str, torch.Tensor] | None:
    """The full state dict (HF names, CPU tensors; tied names share one tensor) on rank 0, None on the
    others. Every rank must call it: it is a collective."""
    if world_size == 1:
        return local_full_state(model)
    state = model.state_dict()
    first_name: dict[int, str] = {}  # a tied tensor (lm_head = embed_tokens) moves once
    for name, tensor in state.items():
        first_name.setdefault(id(tensor), name)
    names = list(first_name.values())
    tensors = [state[n] for n in names]
    if not one_gather_works(tensors, world_size):
        gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return gathered if rank == 0 else None
    held = [[_elements_held(t, r, world_size) for t in tensors] for r in range(world_size)]
    mine = torch.zeros(max(map(sum, held)), dtype=tensors[0].dtype)
    offset = 0
    for t, n in zip(tensors, held[rank]):
        if not n:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.numel() != n:
            raise RuntimeError(f"the FSDP2 shard of a {tuple(t.shape)} tensor holds {local.numel()} elements on rank "
                               f"{rank}, not the {n} that torch.chunk on dim 0 gives")
        mine[offset : offset + n] = local.detach().reshape(-1)
        offset += n
    received = [torch.empty_like(mine) for _ in range(world_size)] if rank == 0 else None
    dist.gather(mine, received, dst=0)
    if rank != 0:
        return None
    assert received is not None
    whole: dict[str, torch.Tensor] = {}
    offsets = [0] * world_size
    for i, (name, t) in enumerate(zip(names, tensors)):
        pieces = []
        for r in range(world_size):
            n = held[r][i]
            pieces.append(received[r][offsets[r] : offsets[r] + n])
            offsets[r] += n
        whole[name] = torch.cat(pieces).view(t.shape)
    return {name: whole[first_name[id(tensor)]] for name, tensor in state.items()}


def one_gather_works(tensors: list[torch.Tensor], world_size: int) -> bool:
    """CPU tensors of one dtype on a gloo group (an NCCL group cannot move host tensors: a GPU run's
    offloaded teacher), every DTensor sharded on dim 0 over all ranks: decided from what every rank
    sees alike, so all ranks take the same path."""
    if dist.get_backend() != "gloo" or len({t.dtype for t in tensors}) != 1 or \
            any(t.device.type != "cpu" for t in tensors):
        return False
    for t in tensors:
        if isinstance(t, DTensor) and (tuple(t.placements) != (Shard(0),) or t.device_mesh.size() != world_size):
            return False
    return True


def _elements_held(t: torch.Tensor, rank: int, world_size: int) -> int:
    """Elements of `t` that `rank` contributes: its dim-0 chunk of a DTensor; all of a plain
    (replicated) tensor from rank 0 only."""
    if not isinstance(t, DTensor):
        return t.numel() if rank == 0 else 0
    rows = t.shape[0]
    chunk = math.ceil(rows / world_size)
    mine = max(0, min(chunk, rows - rank * chunk))
    return mine * (t.numel() // rows if rows else 0)
