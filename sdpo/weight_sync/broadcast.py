"""Weight transport (b), separate GPUs: learner rank 0 broadcasts bucketed tensors to every engine
worker over a process group of its own (not the learners' FSDP group, not vLLM's TP group).

Group ranks: 0 is the learner's sender; replica r's engine worker w is 1 + r * workers + w.
Both sides join with `join_weight_group` at the same time (rank 0 hosts the TCP rendezvous).

Wire protocol, per bucket (see buckets.py): an int64 [header length], the JSON header (a list of
[name, dtype, shape]), then the packed bytes. A header length of 0 ends the transfer. Headers travel
inside the group, so the sender can gather tensors lazily (FSDP `full_tensor()`) and nothing but
"start" and "done" passes through the driver.

Backends: "nccl" (CUDA; vLLM's StatelessProcessGroup + PyNcclCommunicator, as vLLM 0.32's own RLHF
weight transfer uses) and "gloo" (CPU: the same protocol, which is how it is tested without a GPU).
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

from sdpo.weight_sync.buckets import TensorMeta, bucket_nbytes, iter_buckets, pack, unpack

SENDER_RANK = 0


class Broadcaster(Protocol):
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, src: int) -> None: ...

    def receive(self, tensor: torch.Tensor) -> None:
        """Fill `tensor` from the sender, or raise WeightSyncTimeout past the group's deadline."""


class WeightSyncTimeout(TimeoutError):
    """No bucket arrived in time: the sender (learner rank 0) died or hung mid-transfer. The
    engine's group is unusable afterwards; the pool replaces the replica and rebuilds the group."""


def _timeout_message(timeout_s: float) -> str:
    return (f"no weight bucket from learner rank 0 within rollout.weight_sync_timeout_s={timeout_s:g}: "
            "the sender died or hung mid-transfer")


class _Nccl:
    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, device: torch.device,
                 timeout_s: float):
        # vLLM's helper: a TCPStore rendezvous outside torch.distributed's default group, then NCCL.
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        # PyNccl checks tensor.device == its own cuda:N, which a bare "cuda" device never equals
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.comm = stateless_init_process_group(master_addr, master_port, rank, world_size, self.device.index)
        self.timeout_s = timeout_s

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        # enqueued on the current stream: later copies from/into `tensor` on that stream are ordered
        self.comm.broadcast(tensor, src=src, stream=torch.cuda.current_stream(self.device))

    def receive(self, tensor: torch.Tensor) -> None:
        # An NCCL receive whose sender is gone never completes, and a host sync on it (`.item()`)
        # would block forever: poll an event behind it instead, and past the deadline abort the
        # communicator (PyNcclCommunicator.destroy calls ncclCommAbort, vLLM 0.32) so that the
        # stuck kernel ends too.
        stream = torch.cuda.current_stream(self.device)
        self.comm.broadcast(tensor, src=SENDER_RANK, stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        deadline = time.monotonic() + self.timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                self.comm.destroy()
                raise WeightSyncTimeout(_timeout_message(self.timeout_s))
            time.sleep(0.001)


class _Gloo:
    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        self.device, self.timeout_s = torch.device("cpu"), timeout_s
        store = dist.TCPStore(master_addr, master_port, world_size, rank == SENDER_RANK, timeout=timeout)
        self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.group.broadcast([tensor], opts).wait()

    def receive(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = SENDER_RANK
        try:
            # gloo gives up after the group's timeout (set at join) and raises
            self.group.broadcast([tensor], opts).wait(datetime.timedelta(seconds=self.timeout_s))
        except (RuntimeError, dist.DistError) as err:  # a timeout, or the sender's connection closed
            raise WeightSyncTimeout(f"{_timeout_message(self.timeout_s)} ({type(err).__name__}: {str(err)[:200]})") from err


def join_weight_group(backend: str, master_addr: str, master_port: int, rank: int, world_size: int,
                      device: torch.device | None = None, timeout_s: float = 600.0) -> Broadcaster:
    """Join the weight group (rank 0 hosts the rendezvous). `timeout_s`: how long a receiver waits
    for each bucket before raising WeightSyncTimeout (rollout.weight_sync_timeout_s)."""
    if backend == "nccl":
        if device is None or device.type != "cuda":
            raise ValueError(f"the nccl weight group needs a CUDA device, got {device}")
        return _Nccl(master_addr, master_port, rank, world_size, device, timeout_s)
    if backend == "gloo":
        return _Gloo(master_addr, master_port, rank, world_size, timeout_s)
    raise ValueError(f"weight group backend must be 'nccl' or 'gloo', got {backend!r}")


def send_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], group: Broadcaster, bucket_bytes: int,
                 dtype: torch.dtype | None = None) -> dict[str, float]:
    """Learner rank 0: broadcast every tensor, bucket by bucket, in the order given (keep the
    model's order: layer by layer). `dtype` casts floating tensors first (e.g. fp32 master weights
    to the engine's bf16: half the bytes). Returns {"buckets", "bytes"}."""
    buffer = torch.empty(bucket_bytes, dtype=torch.uint8, device=group.device)
    buckets = sent = 0
    for bucket in iter_buckets(_on(named_tensors, group.device, dtype), bucket_bytes):
        flat, metas = pack(bucket, buffer)  # a tensor over bucket_bytes gets a buffer of its own
        header = json.dumps([m.to_json() for m in metas]).encode()
        group.broadcast(torch.tensor([len(header)], dtype=torch.int64, device=group.device), SENDER_RANK)
        group.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(group.device), SENDER_RANK)
        group.broadcast(flat, SENDER_RANK)
        buckets, sent = buckets + 1, sent + flat.numel()
    group.broadcast(torch.zeros(1, dtype=torch.int64, device=group.device), SENDER_RANK)  # end of transfer
    if group.device.type == "cuda":
        torch.cuda.current_stream(group.device).synchronize()
    return {"buckets": float(buckets), "bytes": float(sent)}


def receive_weights(group: Broadcaster) -> Iterator[tuple[str, torch.Tensor]]:
    """Engine worker: yield (name, tensor) as buckets arrive, until the sender's end marker. Each
    bucket is a fresh buffer, so the yielded views stay valid however long the loader keeps them."""
    while True:
        length = torch.zeros(1, dtype=torch.int64, device=group.device)
        group.receive(length)
        if int(length.item()) == 0:
            return
        raw = torch.empty(int(length.item()), dtype=torch.uint8, device=group.device)
        group.receive(raw)
        metas = [TensorMeta.from_json(item) for item in json.loads(raw.cpu().numpy().tobytes())]
        flat = torch.empty(bucket_nbytes(metas), dtype=torch.uint8, device=group.device)
        group.receive(flat)
        yield from unpack(flat, metas)


def _on(named_tensors, device: torch.device, dtype: torch.dtype | None):
    for name, tensor in named_tensors:
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, tensor.to(device, non_blocking=True)
