"""Our learner step in this process: one FSDP2 rank (world size 1, the same code every rank runs),
teacher forward + student forward/backward per micro-batch, AdamW, EMA teacher update."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..")]

import torch  # noqa: E402
from protocol import serve  # noqa: E402
from workload import load_batch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overrides", default="[]", help="JSON list of key=value config overrides")
    a = p.parse_args()

    from sdpo.batch import TrainSample
    from sdpo.learner.micro_batches import rank_plans
    from sdpo.learner.objective import Totals
    from sdpo.learner.worker import LearnerWorker
    from sdpo.recipe import load_config

    batch = [TrainSample(s["prompt_ids"], s["response_ids"], s["rollout_logprobs"], s["teacher_prompt_ids"], s["sd_mask"])
             for s in load_batch(a.batch)]
    device = ["device=cuda", "learner.num_gpus_per_rank=1", "rollout.num_gpus_per_replica=1"] if a.device == "cuda" else []
    # The paper's distillation (JSD alpha 0.5, student top-100 + tail), EMA teacher, AdamW, grad clip:
    # the defaults, on one rank.
    cfg = load_config(None, ["learner.world_size=1", f"learner.torch_threads_per_rank={a.threads}", "prompts_per_step=1",
                             "rollout.samples_per_prompt=1", "optimizer.warmup_steps=0", *device, *json.loads(a.overrides)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = LearnerWorker(0, 1, cfg.model_dump_json(), a.model)
    worker.setup("127.0.0.1", port)
    micros = rank_plans(batch, 1, cfg)[0]  # what LearnerGroup.train_step hands rank 0
    totals = Totals(sequences=len(batch), sd_tokens=sum(len(s.response_ids) for s in batch if s.sd_mask),
                    all_tokens=sum(len(s.response_ids) for s in batch))

    def step() -> dict:
        stats = worker.train_step(micros, totals)
        return {"loss": stats["loss"], "grad_norm": stats["grad_norm"], "micro_batches": len(micros)}

    cuda = a.device == "cuda"
    serve(step, sync=torch.cuda.synchronize if cuda else (lambda: None),
          cuda_peak_mib=(lambda: torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
          cuda_reset=torch.cuda.reset_peak_memory_stats if cuda else None)
    worker.shutdown()


if __name__ == "__main__":
    main()
