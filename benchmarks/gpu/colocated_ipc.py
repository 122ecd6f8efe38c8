"""GPU benchmark for the colocated placement: learner step, and the CUDA-IPC weight hand-off to the
HF rollout engine on the same GPU, against the shared-memory file hand-off in the same run.

Two processes share one GPU, as a colocated learner rank and rollout replica do: this one is the
learner (random-init model of Qwen2-0.5B's shape, AdamW, bf16 autocast); a spawned child runs
`HFEngine`. The hand-off is the code the framework uses (`weight_sync.buckets.pack`,
`weight_sync.handles.export_bucket` / the engine's `load_weight_bucket`); only Ray is replaced by a
pipe, since the GPU machine has no Ray. After each hand-off the engine's log-probs are checked
against the learner's own: a transfer that lands wrong weights fails the run.

Run by benchmarks/gpu/run.sh. `--device cpu --tiny` is the CPU smoke test (file handles instead of
CUDA IPC, a 1M-parameter model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, head_dim=64)
TINY = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=512, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True, head_dim=64)


def make_config(tiny: bool):
    from transformers import Qwen2Config

    return Qwen2Config(max_position_embeddings=4096, **(TINY if tiny else QWEN2_05B))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the engine process -----------------------------------------------------------------------
def engine_main(conn, model_dir: str, device: str, dtype: str) -> None:
    from sdpo.rollout.hf_engine import HFEngine

    engine = HFEngine(model_dir, dtype=dtype, device=device)
    conn.send(("ready", None))
    while True:
        command, args = conn.recv()
        try:
            if command == "stop":
                conn.send(("ok", None))
                return
            result = getattr(engine, command)(*args)
            sync(engine.device)
            conn.send(("ok", result))
        except Exception as error:  # report, keep serving: the learner decides
            conn.send(("error", repr(error)))


class EngineClient:
    def __init__(self, model_dir: str, device: str, dtype: str):
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=engine_main, args=(child, model_dir, device, dtype), daemon=True)
        self.process.start()
        self._expect()

    def call(self, command: str, *args):
        self.conn.send((command, args))
        return self._expect()

    def _expect(self):
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"engine process: {value}")
        return value

    def close(self) -> None:
        self.call("stop")
        self.process.join(timeout=30)


# ---- learner side --------------------------------------------------------------------------
def learner_step_seconds(model, optimizer, batch: torch.Tensor, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del logits, loss
        sync(device)
        times.append(time.perf_counter() - started)
    return times


def named_weights(model, dtype: torch.dtype):
    """What a learner rank sends: each tensor once (a tied lm_head is the embedding), in module
    order, cast to the engine's dtype."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unique = {n for n, _ in model.named_parameters()}
    for name, tensor in model.state_dict().items():
        if name in params and name not in unique:
            continue
        yield name, tensor.detach().to(dtype)


def handoff_by_handle(model, engine: EngineClient, bucket_bytes: int, dtype: torch.dtype, device: torch.device) -> dict:
    """begin; per bucket: pack into a reused GPU buffer, export its handle, the engine copies out;
    finish. One round trip per bucket (the framework's send_weights_by_handle over Ray overlaps two)."""
    from sdpo.weight_sync.buckets import iter_buckets, pack
    from sdpo.weight_sync.handles import export_bucket, release_bucket

    sync(device)
    started = time.perf_counter()
    engine.call("begin_weight_update")
    buffer = torch.empty(bucket_bytes, dtype=torch.uint8, device=device)
    buckets = sent = 0
    for bucket in iter_buckets(named_weights(model, dtype), bucket_bytes):
        flat, metas = pack(bucket, buffer)
        sync(device)
        handle = export_bucket(flat)
        engine.call("load_weight_bucket", handle, [m.to_json() for m in metas])
        release_bucket(handle)
        buckets, sent = buckets + 1, sent + flat.numel()
    engine.call("finish_weight_update")
    return {"seconds": time.perf_counter() - started, "buckets": buckets, "bytes": sent}


def handoff_by_file(model, engine: EngineClient, directory: str, dtype: torch.dtype, device: torch.device) -> dict:
    """The shm transport for comparison: one safetensors file in /dev/shm, the engine reloads it."""
    from sdpo.weight_sync.files import write_weights

    sync(device)
    started = time.perf_counter()
    path = write_weights(dict(named_weights(model, dtype)), directory, version=1)
    engine.call("load_weights", path)
    return {"seconds": time.perf_counter() - started, "bytes": os.path.getsize(path)}


@torch.no_grad()
def logprob_gap(model, engine: EngineClient, device: torch.device, vocab: int) -> float:
    """max |engine log-prob - learner log-prob| on a fixed sequence, both in the engine's dtype."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (32,), generator=gen).tolist()
    response = torch.randint(0, vocab, (32,), generator=gen).tolist()
    engine_lp = torch.tensor(engine.call("score", [prompt], [response])[0], dtype=torch.float64)
    ids = torch.tensor([prompt + response], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    mine = logits.log_softmax(-1).gather(-1, torch.tensor(response, device=device)[:, None]).squeeze(-1)
    return (engine_lp - mine.double().cpu()).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a 1M-parameter model (smoke test)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per learner step")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=8, help="timed learner steps (after 2 warm-up)")
    parser.add_argument("--bucket-mib", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5, help="hand-offs per bucket size (median)")
    parser.add_argument("--out", default=None, help="results file (default: $OUT/ or benchmarks/gpu/results/)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --tiny for the CPU smoke test")
    if args.tiny:
        args.batch, args.seq, args.steps, args.repeats = min(args.batch, 2), min(args.seq, 64), min(args.steps, 2), min(args.repeats, 2)
        args.bucket_mib = [1]
    device = torch.device(args.device)
    engine_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    from transformers import Qwen2ForCausalLM

    config = make_config(args.tiny)
    out = args.out or os.path.join(os.environ.get("OUT") or "benchmarks/gpu/results",
                                   f"colocated_ipc_{'tiny_' if args.tiny else ''}{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def save() -> None:  # after every measurement: a timeout later keeps what was measured
        with open(out + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(out + ".tmp", out)

    results: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "model": "tiny" if args.tiny else "Qwen2-0.5B shape (random init)"}
    torch.manual_seed(0)
    with torch.device(device):
        config._attn_implementation = "sdpa"
        model = Qwen2ForCausalLM(config).to(torch.float32)
    results["params"] = sum(p.numel() for p in model.parameters())
    model_dir = tempfile.mkdtemp(prefix="sdpo-gpu-bench-")
    model.save_pretrained(model_dir)  # the engine starts from these, the pre-training weights
    print(f"model: {results['params'] / 1e6:.1f}M params on {results['device']}", flush=True)

    # learner step: fp32 master weights, bf16 autocast on GPU, AdamW
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    learner_step_seconds(model, optimizer, batch, 2, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = learner_step_seconds(model, optimizer, batch, args.steps, device)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    flops = 6 * results["params"] * tokens  # dense-transformer estimate, attention not counted
    results["learner_step"] = {"batch": args.batch, "seq": args.seq, "median_s": step_s, "tokens_per_s": tokens / step_s,
                               "tflops_per_s_6N": flops / step_s / 1e12,
                               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    save()
    print(f"learner step: {step_s * 1e3:.1f} ms median of {args.steps} ({tokens / step_s:,.0f} tok/s, "
          f"~{flops / step_s / 1e12:.0f} TFLOP/s by 6N)", flush=True)
    del batch
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # A few steps at lr 1e-5 barely move random weights: perturb them so that an engine with stale
    # weights is measurably off and the check after each hand-off means something.
    gen = torch.Generator(device=device).manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device=device) * p.detach().float().std().clamp(min=1e-3))

    # weight hand-off into the engine process on the same device
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as shm:
        engine = EngineClient(model_dir, args.device, "bfloat16" if engine_dtype == torch.bfloat16 else "float32")
        try:
            # the learner trained, so the engine is stale until a hand-off lands
            results["logprob_gap_before_sync"] = logprob_gap(model, engine, device, config.vocab_size)
            handoffs = results["handoff"] = {}
            for mib in args.bucket_mib:
                runs = [handoff_by_handle(model, engine, mib * 2**20, engine_dtype, device) for _ in range(args.repeats)]
                gap = logprob_gap(model, engine, device, config.vocab_size)
                handoffs[f"ipc_bucket_{mib}mib"] = {"median_s": statistics.median(r["seconds"] for r in runs),
                                                    "buckets": runs[0]["buckets"], "bytes": runs[0]["bytes"],
                                                    "logprob_gap_after": gap}
                save()
                print(f"hand-off by handle, {mib} MiB buckets: {handoffs[f'ipc_bucket_{mib}mib']['median_s'] * 1e3:.1f} ms "
                      f"({runs[0]['buckets']} buckets, {runs[0]['bytes'] / 2**20:.0f} MiB); log-prob gap after {gap:.2e}", flush=True)
            runs = [handoff_by_file(model, engine, shm, engine_dtype, device) for _ in range(args.repeats)]
            handoffs["shm_file"] = {"median_s": statistics.median(r["seconds"] for r in runs), "bytes": runs[0]["bytes"],
                                    "logprob_gap_after": logprob_gap(model, engine, device, config.vocab_size)}
            print(f"hand-off by /dev/shm file: {handoffs['shm_file']['median_s'] * 1e3:.1f} ms", flush=True)
            best = min(v["median_s"] for k, v in handoffs.items() if k.startswith("ipc"))
            handoffs["shm_over_best_ipc"] = handoffs["shm_file"]["median_s"] / best
            save()
        finally:
            engine.close()
            shutil.rmtree(model_dir, ignore_errors=True)

    worst_gap = max(v["logprob_gap_after"] for v in results["handoff"].values() if isinstance(v, dict))
    # bf16 engine vs bf16-autocast learner: different kernels, so a small gap remains on GPU; stale
    # weights (the gap before the first sync) must be far above it
    tol = 1e-4 if device.type == "cpu" else min(0.05, 0.1 * results["logprob_gap_before_sync"])
    results["handoff_correct"] = worst_gap < tol
    save()
    print(json.dumps(results))
    print(f"wrote {out}")
    if not results["handoff_correct"]:
        sys.exit(f"weight hand-off landed wrong weights: worst log-prob gap {worst_gap:.2e} >= {tol}")


if __name__ == "__main__":
    main()
