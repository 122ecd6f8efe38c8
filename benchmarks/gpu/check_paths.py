"""GPU-only code paths that need neither vLLM nor Ray, checked on a real GPU (the device machine
has neither). Each check appends one JSON line to $OUT/gpu_paths.jsonl as soon as it has a result.

1. cuda_ipc handle: `export_bucket` of a CUDA bucket is plain data (marshal, which like vLLM's
   msgpack encoder refuses classes and dtypes, must take it) and another process opens it.
2. teacher_offload + chunk_tokens: `full_weight` gathers a CPU-offloaded FSDP2 shard under an
   NCCL-only process group (the raw `full_tensor()` is recorded for comparison).
3. flash-attn: a bf16 forward through `pick_attention`'s choice; fp32 is recorded for comparison.
4. release_memory: `torch.cuda.empty_cache` returns a learner's cached blocks to the driver.

    python3 benchmarks/gpu/check_paths.py            # on the GPU (run.sh calls it)
    python3 benchmarks/gpu/check_paths.py --device cpu   # what runs without a GPU (check 1 with a file handle)
"""

from __future__ import annotations

import argparse
import json
import marshal
import os
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def record(out: str, name: str, ok: bool, **details) -> None:
    with open(out, "a") as f:
        f.write(json.dumps({"check": name, "ok": ok, "time": time.strftime("%H:%M:%S"), **details}) + "\n")
    print(f"[{'ok' if ok else 'FAIL'}] {name} {details}", flush=True)


def _open_in_child(raw: bytes, device: str, queue) -> None:
    from sdpo.weight_sync.handles import open_bucket

    try:
        flat = open_bucket(marshal.loads(raw), torch.device(device))
        queue.put(("ok", flat.cpu().tolist()))
    except Exception as err:  # reported to the parent
        queue.put(("error", repr(err)))


def check_handle(out: str, device: str) -> None:
    from sdpo.weight_sync.handles import export_bucket, release_bucket

    flat = torch.arange(256, dtype=torch.uint8, device=device)
    handle = export_bucket(flat)
    try:
        raw = marshal.dumps(handle)  # raises ValueError on a class, a dtype or a storage type
    except ValueError as err:
        record(out, "cuda_ipc_handle_plain", False, error=repr(err))
        return
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_open_in_child, args=(raw, device, queue))
    child.start()
    status, value = queue.get(timeout=120)
    child.join(timeout=30)
    release_bucket(handle)
    record(out, "cuda_ipc_handle_plain", status == "ok" and value == list(range(256)), kind=handle["kind"],
           child=status if status == "ok" else value)


def check_offloaded_gather(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from sdpo.learner.model import full_weight

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)  # NCCL only, as the learner's group
    try:
        mesh = init_device_mesh("cuda", (1,))
        layer = torch.nn.Linear(64, 32)
        expected = layer.weight.detach().clone()
        fully_shard(layer, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=True))
        try:
            layer.weight.full_tensor()
            raw = "ok"
        except Exception as err:
            raw = repr(err)[:200]
        try:
            got = full_weight(layer.weight)
            ok = torch.equal(got.cpu(), expected)
            record(out, "offloaded_lm_head_gather", ok, raw_full_tensor=raw)
        except Exception as err:
            record(out, "offloaded_lm_head_gather", False, error=repr(err)[:300], raw_full_tensor=raw)
    finally:
        dist.destroy_process_group()


def check_flash_attention(out: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sdpo.learner.model import pick_attention

    choice = pick_attention("auto", "cuda", mixed_precision="bf16")
    config = Qwen2Config(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, intermediate_size=512)
    ids = torch.randint(0, 1024, (2, 128), device="cuda")
    details = {"auto_under_bf16": choice, "auto_under_fp32": pick_attention("auto", "cuda", mixed_precision="no")}
    model = Qwen2ForCausalLM._from_config(config, attn_implementation=choice).cuda()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids)
        ok = True
    except Exception as err:
        ok, details["error"] = False, repr(err)[:300]
    if choice == "flash_attention_2":
        try:
            model.float()(input_ids=ids)  # what learner.mixed_precision=no would run: refused by config now
            details["fp32_flash"] = "ran"
        except Exception as err:
            details["fp32_flash"] = repr(err)[:200]
    record(out, "flash_attention_choice", ok, **details)


def check_release_memory(out: str) -> None:
    block = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    del block
    cached = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()  # what LearnerWorker.release_memory does
    record(out, "release_memory", torch.cuda.memory_reserved() < cached, reserved_before_mib=cached >> 20,
           reserved_after_mib=torch.cuda.memory_reserved() >> 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT") or "benchmarks/gpu/results", "gpu_paths.jsonl"))
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    checks = [("cuda_ipc_handle_plain", lambda: check_handle(args.out, args.device))]
    if args.device == "cuda":
        checks += [("offloaded_lm_head_gather", lambda: check_offloaded_gather(args.out)),
                   ("flash_attention_choice", lambda: check_flash_attention(args.out)),
                   ("release_memory", lambda: check_release_memory(args.out))]
    for name, check in checks:
        try:
            check()
        except Exception as err:  # one broken check must not hide the others' results
            record(args.out, name, False, error=repr(err)[:300])


if __name__ == "__main__":
    main()
