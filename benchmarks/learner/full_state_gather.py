"""The learner side of a CPU weight push: gathering an FSDP2 model's full weights on rank 0, ours
(`sdpo.learner.full_state`: one gather of every rank's shards packed flat) against torch's
`get_model_state_dict(full_state_dict=True, cpu_offload=True)` (one collective per tensor), on the
same sharded model in the same processes, alternating, over gloo.

    python benchmarks/learner/full_state_gather.py [--model tiny-arithmetic] [--ranks 2] [--repeats 30]

Prints the median milliseconds of each and their ratio (rank 0's clock, a barrier before each call).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def rank_main(rank: int, world_size: int, port: int, model: str, repeats: int, queue) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from sdpo.learner.full_state import full_state
    from sdpo.learner.model import shard
    from sdpo.models import resolve_model_path

    torch.set_num_threads(1)  # as the learner ranks run on CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        sharded = shard(AutoModelForCausalLM.from_pretrained(resolve_model_path(model), torch_dtype=torch.float32),
                        init_device_mesh("cpu", (world_size,)), "no")
        ways = {"ours (one gather)": lambda: full_state(sharded, rank, world_size),
                "torch get_model_state_dict": lambda: get_model_state_dict(
                    sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for i in range(repeats + 2):
            for name, way in ways.items():
                dist.barrier()
                started = time.perf_counter()
                state = way()
                if i >= 2:  # two warm-up rounds
                    times[name].append((time.perf_counter() - started) * 1e3)
        if rank == 0:
            queue.put({"tensors": len(state), "elements": sum(t.numel() for t in state.values()),
                       **{name: statistics.median(ts) for name, ts in times.items()}})
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
    procs = [context.Process(target=rank_main, args=(r, args.ranks, port, args.model, args.repeats, queue))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    ours, theirs = result["ours (one gather)"], result["torch get_model_state_dict"]
    print(f"{args.model}: {result['tensors']} tensors, {result['elements']:,} elements, {args.ranks} ranks, "
          f"median of {args.repeats}")
    print(f"| way | ms |\n| --- | --- |\n| ours (one gather) | {ours:.1f} |\n| torch get_model_state_dict | {theirs:.1f} |")
    print(f"ratio: torch / ours = {theirs / ours:.1f}x")


if __name__ == "__main__":
    main()
