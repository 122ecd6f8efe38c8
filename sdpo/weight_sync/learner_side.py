"""What a learner rank calls to push its weights (nccl and cuda_ipc transports).

Every rank must call `push_weights` together: gathering an FSDP2 shard (`DTensor.full_tensor()`) is
a collective, so every rank walks the same tensors in the same order, and only the ranks that
send keep what they gathered (one tensor at a time: the full model is never held at once).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sdpo.weight_sync.broadcast import SENDER_RANK, Broadcaster, send_weights
from sdpo.weight_sync.handles import send_weights_by_handle


def iter_full_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) in module order (embeddings, layer 0, layer 1, ...), gathering FSDP2
    shards one tensor at a time. A tensor tied to an earlier one (lm_head = embed_tokens) is skipped:
    the engines re-tie it themselves."""
    # named_parameters() lists a shared parameter once, under its first name, identically on every
    # rank (storage pointers would not do: an empty shard has none)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    unique = {name for name, _ in model.named_parameters()}
    for name, tensor in model.state_dict().items():
        if name in params and name not in unique:
            continue
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        yield name, full.detach()


def push_weights(named_tensors: Iterator[tuple[str, torch.Tensor]], *, transport: str, rank: int, version: int,
                 bucket_bytes: int, device: torch.device, group: Broadcaster | None = None,
                 receivers: list | None = None, dtype: torch.dtype | None = None) -> dict[str, float]:
    """nccl: rank 0 broadcasts over `group` (joined with `broadcast.join_weight_group` as rank 0).
    cuda_ipc: each rank hands buckets to `receivers`, the rollout actors on its own GPU
    (`RolloutPool.receivers_for_rank(rank)`). Ranks with nothing to send still walk the tensors."""
    if transport == "nccl" and rank == SENDER_RANK:
        if group is None:
            raise ValueError("push_weights(transport='nccl') on rank 0 needs the weight group")
        return send_weights(named_tensors, group, bucket_bytes, dtype)
    if transport == "cuda_ipc" and receivers:
        return send_weights_by_handle(named_tensors, receivers, version, bucket_bytes, device, dtype)
    if transport not in ("nccl", "cuda_ipc"):
        raise ValueError(f"push_weights moves nccl or cuda_ipc transfers, got {transport!r} (shm: export_weights)")
    for _ in named_tensors:  # join every gather, send nothing
        pass
    return {"buckets": 0.0, "bytes": 0.0}
