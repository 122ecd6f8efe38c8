"""What a CPU weight push costs, piece by piece, in one process (no Ray): the learner's full-state
gather, the safetensors write to /dev/shm, the file read (safetensors' and the engines' own), and
vLLM-CPU's reload of the weights (with its GEMM repacking) both ways: in place (our default on CPU:
after the first load, the recorded copies of copy_plan.py) and through vLLM's layer-wise reload; and
what share of each goes to rebuilding vLLM-CPU's oneDNN GEMM handles and to tensor copies (from a
cProfile of the same load, applied to the unprofiled median).

    python benchmarks/e2e/weight_push.py [MODEL_DIR] --repeat 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def timed(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--repeat", type=int, default=10)
    a = p.parse_args()
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from sdpo.learner.worker import LearnerWorker
    from sdpo.models import resolve_model_path
    from sdpo.recipe import load_config
    from sdpo.weight_sync.files import read_weights, write_weights

    model = resolve_model_path(a.model or "tiny-arithmetic")
    cfg = load_config(None, ["learner.world_size=1", "learner.torch_threads_per_rank=2", "prompts_per_step=1",
                             "rollout.samples_per_prompt=1"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = LearnerWorker(0, 1, cfg.model_dump_json(), model)
    params = worker.setup("127.0.0.1", port)
    directory = tempfile.mkdtemp(prefix="sdpo-push-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    rows = {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    rows["gather full state (1 rank)"], state = timed(lambda: get_model_state_dict(worker.student, options=options), a.repeat)
    version = iter(range(1, 10**6))
    rows["safetensors write to shm"], path = timed(lambda: write_weights(state, directory, next(version)), a.repeat)
    rows["export_weights (1 rank writes its rows: the whole file)"], path = timed(
        lambda: worker.export_weights(directory, next(version)), a.repeat)

    def read():
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    rows["safetensors read (get_tensor copies each)"], _ = timed(read, a.repeat)
    rows["read_weights (views of one memory map, the engines' reader)"], _ = timed(lambda: list(read_weights(path)), a.repeat)
    worker.shutdown()  # vLLM in-process sets up its own process group of size 1

    from sdpo.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(model)
    for way, in_place in (("in place", None), ("vLLM layer-wise", False)):
        row = f"engine load from the file, {way}"
        rows[row], _ = timed(lambda: engine.llm.collective_rpc("sdpo_reload_weights", args=(path, in_place)), a.repeat)
        for what, share in engine.llm.collective_rpc(_reload_shares, args=(path, in_place, a.repeat))[0].items():
            rows[f"  {way}: {what} ({share:.0%})"] = share * rows[row]
    rows["engine reset_prefix_cache"], _ = timed(lambda: engine.llm.reset_prefix_cache(), a.repeat)
    rows["engine.load_weights (in place + reset, the sync's call)"], _ = timed(lambda: engine.load_weights(path), a.repeat)
    engine.close()
    bytes_ = os.path.getsize(path)
    print(f"model {model}: {params / 1e6:.2f}M params, file {bytes_ / 1e6:.2f} MB; medians of {a.repeat}")
    for k, v in rows.items():
        print(f"{k:<60}{v:>9.2f} ms")
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


def _reload_shares(worker_self, path: str, in_place: bool | None, repeat: int) -> dict:
    """Runs inside the vLLM worker: the share of `sdpo_reload_weights` spent in each named C call."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(repeat):
        worker_self.sdpo_reload_weights(path, in_place)
    profile.disable()
    stats = pstats.Stats(profile).stats  # {(file, line, name): (calls, primitive, tottime, cumtime, callers)}
    total = sum(row[2] for row in stats.values())

    def spent(name: str) -> float:
        return sum(row[2] for (_, _, fn), row in stats.items() if name in fn) / total

    handles, copies = spent("create_onednn_mm_handler"), spent("'copy_'")
    return {"oneDNN GEMM handle rebuild": handles, "tensor copies": copies, "the rest": 1 - handles - copies}


if __name__ == "__main__":
    main()
