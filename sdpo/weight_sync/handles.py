"""Weight transport (c), colocated GPUs: learner rank 0 packs a bucket into a GPU buffer and hands
the receiving engine a CUDA IPC handle to it; the engine maps the same memory and copies out.
No bytes cross PCIe or a network, and the driver sees only "begin" and "done".

`send_weights_by_handle` calls the rollout actors directly from the learner (Ray actor handles
travel as arguments): one RPC per bucket per replica, never one per parameter.

On CPU the same protocol runs with a shared-memory file per bucket instead of an IPC handle, so the
bucket path through the real engines is tested without a GPU.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable

import torch

from sdpo.weight_sync.buckets import TensorMeta, iter_buckets, pack, unpack

BUFFERS = 2  # bucket k+1 is packed while the engines still read bucket k


# The fields of torch's CUDA IPC export (`torch.multiprocessing.reductions.reduce_tensor` returns
# `rebuild_cuda_tensor` and these fifteen arguments, torch 2.13), in order.
_IPC_ARGS = ("tensor_cls", "tensor_size", "tensor_stride", "tensor_offset", "storage_cls", "dtype", "storage_device",
             "storage_handle", "storage_size_bytes", "storage_offset_bytes", "requires_grad", "ref_counter_handle",
             "ref_counter_offset", "event_handle", "event_sync_required")


def export_bucket(flat: torch.Tensor, shm_dir: str | None = None) -> dict:
    """A handle to a packed bucket that another process on this machine can open.

    The handle is plain data (str, int, bool, bytes): vLLM runs its engine core in another process
    on GPUs and msgpack-encodes every `collective_rpc` argument, refusing classes, dtypes and storage
    types unless VLLM_ALLOW_INSECURE_SERIALIZATION=1 (vllm/v1/serial_utils.py, MsgpackEncoder.enc_hook)."""
    if flat.is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        _, args = reduce_tensor(flat)
        return ipc_handle_from_args(args, str(torch.cuda.get_device_properties(flat.device).uuid))
    directory = shm_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    path = os.path.join(directory, f"sdpo-bucket-{os.getpid()}-{uuid.uuid4().hex}.bin")
    flat.numpy().tofile(path)
    return {"kind": "file", "path": path, "nbytes": flat.numel()}


def ipc_handle_from_args(args: tuple, gpu_uuid: str) -> dict:
    """`reduce_tensor`'s arguments for a flat uint8 bucket, as plain data. The class, storage type
    and dtype are fixed for a bucket, so only the numbers and the opaque handles travel."""
    a = dict(zip(_IPC_ARGS, args, strict=True))
    if a["dtype"] != torch.uint8 or len(a["tensor_size"]) != 1 or tuple(a["tensor_stride"]) != (1,):
        raise ValueError(f"a weight bucket is a flat contiguous uint8 tensor, got {a['dtype']} of shape {tuple(a['tensor_size'])}")
    return {
        "kind": "cuda_ipc", "gpu_uuid": gpu_uuid, "numel": int(a["tensor_size"][0]), "tensor_offset": int(a["tensor_offset"]),
        "storage_device": int(a["storage_device"]), "storage_handle": _bytes(a["storage_handle"]),
        "storage_size_bytes": int(a["storage_size_bytes"]), "storage_offset_bytes": int(a["storage_offset_bytes"]),
        "ref_counter_handle": _bytes(a["ref_counter_handle"]), "ref_counter_offset": int(a["ref_counter_offset"]),
        "event_handle": _bytes(a["event_handle"]), "event_sync_required": bool(a["event_sync_required"]),
    }


def ipc_args_from_handle(handle: dict, device_index: int) -> tuple:
    """`rebuild_cuda_tensor`'s arguments again, on the receiving side. `device_index` is the GPU as
    this process numbers it (CUDA_VISIBLE_DEVICES may differ from the sender's)."""
    a = dict(tensor_cls=torch.Tensor, tensor_size=torch.Size([handle["numel"]]), tensor_stride=(1,),
             tensor_offset=handle["tensor_offset"], storage_cls=torch.storage.TypedStorage, dtype=torch.uint8,
             storage_device=device_index, storage_handle=handle["storage_handle"],
             storage_size_bytes=handle["storage_size_bytes"], storage_offset_bytes=handle["storage_offset_bytes"],
             requires_grad=False, ref_counter_handle=handle["ref_counter_handle"],
             ref_counter_offset=handle["ref_counter_offset"], event_handle=handle["event_handle"],
             event_sync_required=handle["event_sync_required"])
    return tuple(a[name] for name in _IPC_ARGS)


def _bytes(value) -> bytes | None:
    return None if value is None else bytes(value)


def open_bucket(handle: dict, device: torch.device) -> torch.Tensor:
    """The bucket's bytes as a uint8 tensor on `device` that the caller owns (a copy: the sender
    reuses its buffer once this call has returned)."""
    if handle["kind"] == "cuda_ipc":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        here = str(torch.cuda.get_device_properties(device).uuid)
        if handle["gpu_uuid"] != here:
            raise RuntimeError(
                f"CUDA IPC weight sync needs the learner and the engine on the same GPU (colocated), but the "
                f"bucket is on GPU {handle['gpu_uuid']} and this engine on {here}: use rollout.weight_sync=nccl"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        return rebuild_cuda_tensor(*ipc_args_from_handle(handle, index)).clone()
    if handle["kind"] == "file":
        flat = torch.from_file(handle["path"], shared=False, size=handle["nbytes"], dtype=torch.uint8)
        return flat.to(device)
    raise ValueError(f"unknown bucket handle kind {handle.get('kind')!r}")


def release_bucket(handle: dict) -> None:
    if handle["kind"] == "file":
        try:
            os.remove(handle["path"])
        except FileNotFoundError:
            pass


def open_named(handle: dict, metas_json: list, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    return unpack(open_bucket(handle, device), [TensorMeta.from_json(m) for m in metas_json])


def send_weights_by_handle(named_tensors: Iterable[tuple[str, torch.Tensor]], receivers: list, version: int,
                           bucket_bytes: int, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Learner rank 0: stream the tensors to every receiver (RolloutWorker actor handles).

    Per sync: `begin_weight_update` on each receiver, then `load_weight_bucket(handle, metas)` per
    bucket, then `finish_weight_update(version)`. Buckets are packed into BUFFERS rotating buffers on
    `device`; a buffer is refilled only once every receiver has copied out of it."""
    import ray

    ray.get([r.begin_weight_update.remote() for r in receivers])
    buffers: list[torch.Tensor | None] = [None] * BUFFERS
    pending: list[tuple[list, dict]] = [([], {})] * BUFFERS
    buckets = sent = 0
    try:
        for i, bucket in enumerate(iter_buckets(_cast(named_tensors, device, dtype), bucket_bytes)):
            slot = i % BUFFERS
            refs, old = pending[slot]
            ray.get(refs)  # the engines are done with what this buffer held
            if old:
                release_bucket(old)
            if buffers[slot] is None:
                buffers[slot] = torch.empty(bucket_bytes, dtype=torch.uint8, device=device)
            flat, metas = pack(bucket, buffers[slot])  # a tensor over bucket_bytes gets a buffer of its own
            if flat.is_cuda:
                torch.cuda.current_stream(flat.device).synchronize()  # the engine reads on its own stream
            handle = export_bucket(flat)
            metas_json = [m.to_json() for m in metas]
            pending[slot] = ([r.load_weight_bucket.remote(handle, metas_json) for r in receivers], handle)
            buckets, sent = buckets + 1, sent + flat.numel()
    finally:
        for refs, handle in pending:
            ray.get(refs)
            if handle:
                release_bucket(handle)
    buffers.clear()
    if device.type == "cuda":
        # finish_weight_update wakes the engine's KV cache on this GPU: return the bucket buffers first
        torch.cuda.empty_cache()
    ray.get([r.finish_weight_update.remote(version) for r in receivers])
    return {"buckets": float(buckets), "bytes": float(sent)}


def _cast(named_tensors, device: torch.device, dtype: torch.dtype | None):
    for name, tensor in named_tensors:
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, tensor.to(device)
