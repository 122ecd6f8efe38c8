"""The learner side of a CPU weight push, on the same sharded model in the same processes,
alternating, over gloo:

- gathering an FSDP2 model's full weights on rank 0: ours (`sdpo.learner.full_state`: one gather of
  every rank's shards packed flat) against torch's `get_model_state_dict(full_state_dict=True,
  cpu_offload=True)` (one collective per tensor);
- the whole export to a file in /dev/shm: that gather, then rank 0 writes the safetensors file and
  every rank meets at a barrier (the export before `shard_file.py`), against every rank writing its
  own rows into the file (`sdpo.learner.shard_file.ShardWriter`, the export now on one machine).

    python benchmarks/learner/full_state_gather.py [--model tiny-arithmetic] [--ranks 2] [--repeats 30]

Prints the median milliseconds of each and their ratios (rank 0's clock, a barrier before each call).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


GATHER, TORCH = "ours (one gather)", "torch get_model_state_dict"
GATHER_WRITE, SHARDS = "one gather, rank 0 writes the file", "every rank writes its rows (ShardWriter)"


def rank_main(rank: int, world_size: int, port: int, model: str, repeats: int, directory: str, queue) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from sdpo.learner.full_state import full_state
    from sdpo.learner.model import shard
    from sdpo.learner.shard_file import ShardWriter
    from sdpo.models import resolve_model_path
    from sdpo.weight_sync.files import write_weights

    torch.set_num_threads(1)  # as the learner ranks run on CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        sharded = shard(AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32),
                        init_device_mesh("cpu", (world_size,)), "no")
        writer = ShardWriter.for_model(sharded, rank, world_size)

        def gather_then_write(version: int) -> None:
            state = full_state(sharded, rank, world_size)
            if rank == 0:
                write_weights(state, os.path.join(directory, "gathered"), version)
            dist.barrier()

        ways = {GATHER: lambda v: full_state(sharded, rank, world_size),
                TORCH: lambda v: get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
                GATHER_WRITE: gather_then_write,
                SHARDS: lambda v: writer.write(os.path.join(directory, "shards"), v)}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for i in range(repeats + 2):
            for name, way in ways.items():
                dist.barrier()
                started = time.perf_counter()
                way(i)
                if i >= 2:  # two warm-up rounds
                    times[name].append((time.perf_counter() - started) * 1e3)
        if rank == 0:
            state = full_state(sharded, rank, world_size)
            queue.put({"tensors": len(state), "elements": sum(t.numel() for t in state.values()),
                       **{name: statistics.median(ts) for name, ts in times.items()}})
        else:
            full_state(sharded, rank, world_size)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-arithmetic")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from tests.conftest import free_ports

    context = multiprocessing.get_context("spawn")
    queue, (port,) = context.Queue(), free_ports(1)
    directory = tempfile.mkdtemp(prefix="sdpo-bench-push-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    procs = [context.Process(target=rank_main, args=(r, args.ranks, port, args.model, args.repeats, directory, queue))
             for r in range(args.ranks)]
    try:
        for p in procs:
            p.start()
        result = queue.get(timeout=600)
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{args.model}: {result['tensors']} tensors, {result['elements']:,} elements, {args.ranks} ranks, "
          f"median of {args.repeats}")
    print("| way | ms |\n| --- | --- |")
    for name in (GATHER, TORCH, GATHER_WRITE, SHARDS):
        print(f"| {name} | {result[name]:.1f} |")
    print(f"ratios: torch / one gather = {result[TORCH] / result[GATHER]:.1f}x; "
          f"gather and write / every rank writes = {result[GATHER_WRITE] / result[SHARDS]:.1f}x")


if __name__ == "__main__":
    main()
