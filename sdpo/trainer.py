"""The SDPO loop. One step: generate, verify, build teacher contexts, learn (the teacher update
happens inside the learner), sync weights. The driver holds no weights; it moves token ids and
file paths between actors."""

from __future__ import annotations

import random
import time
from pathlib import Path

from environments import Task, load_environment
from sdpo.batch import build_batch
from sdpo.chat import chat_ids
from sdpo.cluster import start_ray
from sdpo.config import Config
from sdpo.env_pool import EnvPool
from sdpo.learner.group import LearnerGroup
from sdpo.metrics import PhaseTimer, RunLogger
from sdpo.models import load_tokenizer, resolve_model_path, stop_token_ids
from sdpo.recipe import to_yaml
from sdpo.rollout.pool import RolloutPool
from sdpo.rollout.weights import default_weights_dir


def train(cfg: Config) -> dict[str, dict[str, float]]:
    env = load_environment(cfg.environment.name, cfg.environment.kwargs)
    train_tasks, eval_tasks = env.tasks(cfg.environment.train_split), env.tasks(cfg.environment.eval_split)[: cfg.eval.max_tasks]
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path)
    stops = stop_token_ids(model_path, tokenizer)
    run_dir = make_run_dir(cfg)
    log = RunLogger(cfg, run_dir)

    started_ray = start_ray(cfg)
    rollout, envs, learners = RolloutPool(cfg, model_path), EnvPool(cfg.environment), LearnerGroup(cfg, model_path)
    log.say(f"run dir {run_dir} | rollout engine: {rollout.engine_kind} x{cfg.rollout.replicas} | "
            f"learner: {cfg.learner.world_size} FSDP2 ranks, {learners.num_params / 1e6:.2f}M params")
    weights_dir = default_weights_dir(run_dir.name)

    def generate_groups(tasks: list[Task], n: int, temperature: float, seed: int):
        prompt_ids = [chat_ids(tokenizer, t.messages) for t in tasks]
        groups = rollout.generate(prompt_ids, n=n, temperature=temperature, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.rollout.max_response_tokens, stop_token_ids=stops, seed=seed)
        return prompt_ids, groups

    def evaluate(step: int) -> dict[str, float]:
        results = {}
        modes = [("t", cfg.eval.temperature, cfg.eval.samples_per_task)] + ([("greedy", 0.0, 1)] if cfg.eval.greedy else [])
        for name, temperature, n in modes:
            _, groups = generate_groups(eval_tasks, n, temperature, seed=10_000_019 + cfg.seed)
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for g in groups for c in g]
            verdicts = envs.verify([t for t in eval_tasks for _ in range(n)], texts)
            success = sum(v.reward >= cfg.teacher_context.success_threshold for v in verdicts) / len(verdicts)
            results[f"eval/success_{name}"] = success
        log.log(step, results)
        return results

    before = evaluate(0)
    sampler = PromptSampler(train_tasks, cfg.seed)
    for step in range(1, cfg.steps + 1):
        timer, started = PhaseTimer(), time.perf_counter()
        tasks = sampler.next(cfg.prompts_per_step)
        n = cfg.rollout.samples_per_prompt
        with timer("generate"):
            prompt_ids, groups = generate_groups(tasks, n, cfg.rollout.temperature, seed=cfg.seed * 1_000_003 + step)
        with timer("verify"):
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for g in groups for c in g]
            flat = envs.verify([t for t in tasks for _ in range(n)], texts)
            verdicts = [flat[i * n : (i + 1) * n] for i in range(len(tasks))]
        with timer("teacher_contexts"):
            batch, teacher_stats = build_batch(tasks, prompt_ids, groups, verdicts, tokenizer, cfg.teacher_context,
                                               cfg.loss.advantage_std_normalize)
        with timer("learn"):
            learn_stats = learners.train_step(batch)  # student + teacher forwards, loss, step, EMA teacher
        with timer("weight_sync"):
            rollout.load_weights(learners.export_weights(weights_dir, step), version=step)
        step_s = time.perf_counter() - started
        log.log(step, {**rollout_stats(flat, groups, cfg), **teacher_stats, **learn_stats, **timer.seconds, "time/step_s": step_s,
                       "throughput/tokens_per_s": learn_stats["learn/response_tokens"] / step_s})
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != cfg.steps:
            evaluate(step)
    after = evaluate(cfg.steps) if cfg.steps else before
    log.close()
    log.say("held-out success  " + "  ".join(f"{k.split('/')[1]}: {before[k]:.3f} -> {after[k]:.3f}" for k in before))
    learners.shutdown()
    rollout.shutdown()
    if started_ray:
        import ray

        ray.shutdown()
    return {"before": before, "after": after, "run_dir": str(run_dir)}


def rollout_stats(verdicts, groups, cfg: Config) -> dict[str, float]:
    rewards = [v.reward for v in verdicts]
    lengths = [len(c.token_ids) for g in groups for c in g]
    failures = sum(1 for v in verdicts if v.info.get("verifier_failure"))
    return {
        "rollout/reward_mean": sum(rewards) / len(rewards),
        "rollout/success_frac": sum(r >= cfg.teacher_context.success_threshold for r in rewards) / len(rewards),
        "rollout/response_tokens_mean": sum(lengths) / len(lengths),
        "verify/failures": float(failures),
    }


class PromptSampler:
    """Shuffled passes over the training tasks, reproducible from the seed."""

    def __init__(self, tasks: list[Task], seed: int):
        if not tasks:
            raise ValueError("the environment returned no training tasks")
        self.tasks, self.rng, self.order = tasks, random.Random(seed), []

    def next(self, count: int) -> list[Task]:
        batch = []
        while len(batch) < count:
            if not self.order:
                self.order = list(range(len(self.tasks)))
                self.rng.shuffle(self.order)
            batch.append(self.tasks[self.order.pop()])
        return batch


def make_run_dir(cfg: Config) -> Path:
    path = Path(cfg.logging.run_dir.format(name=cfg.name, time=time.strftime("%Y%m%d-%H%M%S")))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    return path
