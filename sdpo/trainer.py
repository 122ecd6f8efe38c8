"""The SDPO loop. One step: generate, verify, build teacher contexts, learn (the teacher update
happens inside the learner), sync weights. The driver holds no weights; it moves token ids and
file paths between actors."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import ray
import torch.distributed as dist

from environments import Task, load_environment
from sdpo.batch import build_batch
from sdpo.chat import chat_ids
from sdpo.checkpoint import Checkpoints, size_bytes, step_of, truncate_metrics
from sdpo.cluster import colocated_placement_group, start_ray
from sdpo.config import Config
from sdpo.env_pool import EnvPool
from sdpo.learner.group import LearnerGroup, LearnerTimeout
from sdpo.metrics import PhaseTimer, RunLogger
from sdpo.models import load_tokenizer, resolve_model_path, stop_token_ids
from sdpo.probe import probe_teacher
from sdpo.recipe import to_yaml
from sdpo.rollout.base import Sampling
from sdpo.rollout.pool import RolloutPool
from sdpo.weight_sync.files import default_weights_dir


def train(cfg: Config, environment: tuple | None = None) -> dict[str, dict[str, float]]:
    """``environment``: (env, tasks by split) already built and read (by ``sdpo.run``'s checks), else built here."""
    env, tasks_by_split = environment or (load_environment(cfg.environment.name, cfg.environment.kwargs), {})
    split_tasks = {split: tasks_by_split.get(split) or list(env.tasks(split))
                   for split in {cfg.environment.train_split, cfg.environment.eval_split}}
    train_tasks, held_out = split_tasks[cfg.environment.train_split], split_tasks[cfg.environment.eval_split]
    eval_tasks, probe_tasks = held_out[: cfg.eval.max_tasks], held_out[: cfg.eval.teacher_probe_tasks]
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path)
    stops = stop_token_ids(model_path, tokenizer)
    run_dir = make_run_dir(cfg)
    checkpoints = Checkpoints(cfg, run_dir)
    resume_from = checkpoints.latest() if cfg.checkpoint.resume == "auto" else None
    # Steps after the checkpoint are replayed, so their rows go; a fresh start drops everything.
    truncate_metrics(run_dir / "metrics.jsonl", after_step=step_of(resume_from) if resume_from else -1)
    log = RunLogger(cfg, run_dir)

    started_ray = start_ray(cfg)
    colocated = colocated_placement_group(cfg)  # None unless GPUs are shared by learner and rollout
    rollout, envs = RolloutPool(cfg, model_path, colocated), EnvPool(cfg.environment)
    learners = LearnerGroup(cfg, model_path, colocated)
    log.say(f"run dir {run_dir} | rollout engine: {rollout.engine_kind} x{cfg.rollout.replicas} | "
            f"learner: {cfg.learner.world_size} FSDP2 ranks, {learners.num_params / 1e6:.2f}M params")
    weights_dir = default_weights_dir(run_dir.name)

    def generate_groups(tasks: list[Task], n: int, temperature: float, seed: int):
        prompt_ids = [chat_ids(tokenizer, t.messages) for t in tasks]
        groups = rollout.generate(prompt_ids, Sampling(n=n, temperature=temperature, top_p=cfg.rollout.top_p,
                                                       max_new_tokens=cfg.rollout.max_response_tokens,
                                                       stop_token_ids=stops, seed=seed))
        return prompt_ids, groups

    def evaluate(step: int) -> dict[str, float]:
        results = {}
        modes = [("t", cfg.eval.temperature, cfg.eval.samples_per_task)] + ([("greedy", 0.0, 1)] if cfg.eval.greedy else [])
        for name, temperature, n in modes:
            _, groups = generate_groups(eval_tasks, n, temperature, seed=10_000_019 + cfg.seed)
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for g in groups for c in g]
            verdicts = envs.verify([t for t in eval_tasks for _ in range(n)], texts, group_size=n)
            success = sum(v.reward >= cfg.teacher_context.success_threshold for v in verdicts) / len(verdicts)
            results[f"eval/success_{name}"] = success
        log.log(step, results)
        return results

    def restore(path: Path | None) -> tuple[int, PromptSampler, dict[str, float] | None]:
        """Learners, engine weights and data position as of checkpoint ``path`` (None: the start)."""
        sampler = PromptSampler(train_tasks, cfg.seed)
        if path is None:
            return 0, sampler, None
        learners.load_checkpoint(str(path))
        state = checkpoints.load_driver_state(path)
        sampler.load_state(state["sampler"])
        rollout.sync_weights(learners, state["step"], weights_dir)  # by the run's transport (a file only with shm)
        log.say(f"resumed from {path} (step {state['step']})")
        return state["step"], sampler, state["before"]

    def restart_learners(err: Exception, step: int) -> LearnerGroup:
        """A new learner group from the last checkpoint (or the initial model), the engine reset to match."""
        started = time.perf_counter()
        latest = checkpoints.latest()
        log.say(f"learner rank lost at step {step} ({type(err).__name__}); restarting the learner group from "
                f"{latest or 'the initial model'} ({restarts}/{cfg.checkpoint.max_learner_restarts})")
        learners.shutdown()
        fresh = LearnerGroup(cfg, model_path, colocated)
        truncate_metrics(run_dir / "metrics.jsonl", after_step=step_of(latest))  # the replayed steps log again
        if latest is None:
            rollout.sync_weights(fresh, 0, weights_dir)  # nccl: rebuilds the weight group for the new rank 0
        log.log(step_of(latest), {"learner/restarts": float(restarts), "learner/restart_s": time.perf_counter() - started})
        return fresh

    step, sampler, before = restore(resume_from)
    if before is None:
        before = evaluate(0)
        if cfg.eval.teacher_probe_every_steps:
            log.log(0, probe_teacher(cfg, probe_tasks, rollout, envs, learners, tokenizer, stops, weights_dir, 0))
    restarts = 0
    while step < cfg.steps:
        step += 1
        timer, started = PhaseTimer(), time.perf_counter()
        tasks = sampler.next(cfg.prompts_per_step)
        n = cfg.rollout.samples_per_prompt
        with timer("generate"):
            prompt_ids, groups = generate_groups(tasks, n, cfg.rollout.temperature, seed=cfg.seed * 1_000_003 + step)
        with timer("verify"):
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for g in groups for c in g]
            flat = envs.verify([t for t in tasks for _ in range(n)], texts, group_size=n)
            verdicts = [flat[i * n : (i + 1) * n] for i in range(len(tasks))]
        with timer("teacher_contexts"):
            batch, teacher_stats = build_batch(tasks, prompt_ids, groups, verdicts, tokenizer, cfg.teacher_context,
                                               cfg.loss.advantage_std_normalize)
        try:
            with timer("learn"):
                rollout.prepare_for_training()  # colocated GPUs: the engines sleep while the learner trains
                learn_stats = learners.train_step(batch)  # teacher + student forwards, loss, step, teacher update
            with timer("weight_sync"):
                rollout.sync_weights(learners, step, weights_dir)  # shm file, NCCL broadcast or CUDA IPC
        # A rank died, a survivor failed in a collective with it, or one hangs: FSDP cannot go on
        # without it, so the group restarts from the last checkpoint. Any other error is a bug or bad
        # input, which a restart would only repeat.
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, LearnerTimeout) as err:
            if not learner_lost(err):
                raise
            if restarts >= cfg.checkpoint.max_learner_restarts:
                raise RuntimeError(f"a learner rank was lost {restarts + 1} times; the last checkpoint is "
                                   f"{checkpoints.latest()}: run the same command to resume from it") from err
            restarts += 1
            learners = restart_learners(err, step)
            step, sampler, _ = restore(checkpoints.latest())  # uses the new group: restore reads `learners`
            continue
        step_s = time.perf_counter() - started
        log.log(step, {**rollout_stats(flat, groups, cfg, step), **teacher_stats, **learn_stats, **timer.seconds, "time/step_s": step_s,
                       "throughput/tokens_per_s": learn_stats["learn/response_tokens"] / step_s})
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != cfg.steps:
            evaluate(step)
        if cfg.eval.teacher_probe_every_steps and (step % cfg.eval.teacher_probe_every_steps == 0 or step == cfg.steps):
            log.log(step, probe_teacher(cfg, probe_tasks, rollout, envs, learners, tokenizer, stops, weights_dir, step))
        if checkpoints.due(step):
            path, seconds = checkpoints.save(step, learners, {"step": step, "sampler": sampler.state(), "before": before})
            log.log(step, {"checkpoint/seconds": seconds, "checkpoint/bytes": float(size_bytes(path))})
    after = evaluate(cfg.steps) if cfg.steps else before
    if cfg.checkpoint.export_hf:
        export_hf(learners, model_path, run_dir / "final_model")
    log.close()
    log.say("held-out success  " + "  ".join(f"{k.split('/')[1]}: {before[k]:.3f} -> {after[k]:.3f}" for k in before))
    learners.shutdown()
    rollout.shutdown()
    for directory in (weights_dir, weights_dir + "-teacher"):  # RAM in /dev/shm: nothing needs it after the run
        shutil.rmtree(directory, ignore_errors=True)
    if started_ray:
        ray.shutdown()
    return {"before": before, "after": after, "run_dir": str(run_dir)}


def learner_lost(err: Exception) -> bool:
    """Whether a learner call failed because a rank is gone (as opposed to raising on its own)."""
    if isinstance(err, (ray.exceptions.RayActorError, LearnerTimeout)):
        return True
    cause = getattr(err, "cause", None)
    return isinstance(cause, (dist.DistBackendError, dist.DistNetworkError)) or any(
        word in str(cause) for word in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))


def export_hf(learners: LearnerGroup, model_path: str, directory: Path) -> None:
    """The policy as a Hugging Face folder (weights, config, tokenizer): from_pretrained and vLLM load it."""
    from transformers import AutoConfig, AutoTokenizer

    learners.export_hf(str(directory))
    AutoConfig.from_pretrained(model_path).save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(directory)
    generation = Path(model_path) / "generation_config.json"
    if generation.exists():
        shutil.copy(generation, directory / generation.name)


def rollout_stats(verdicts, groups, cfg: Config, step: int) -> dict[str, float]:
    rewards = [v.reward for v in verdicts]
    lengths = [len(c.token_ids) for g in groups for c in g]
    failures = sum(1 for v in verdicts if v.info.get("verifier_failure"))
    return {
        # Synchronous training samples step s with the weights of step s-1: the lag must read 0.
        "rollout/policy_version_lag_max": float((step - 1) - min(c.policy_version for g in groups for c in g)),
        "rollout/reward_mean": sum(rewards) / len(rewards),
        "rollout/success_frac": sum(r >= cfg.teacher_context.success_threshold for r in rewards) / len(rewards),
        "rollout/response_tokens_mean": sum(lengths) / len(lengths),
        "verify/failures": float(failures),
    }


class PromptSampler:
    """Shuffled passes over the training tasks, reproducible from the seed and resumable."""

    def __init__(self, tasks: list[Task], seed: int):
        if not tasks:
            raise ValueError("the environment returned no training tasks")
        self.tasks, self.rng, self.order = tasks, random.Random(seed), []

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order), "num_tasks": len(self.tasks)}

    def load_state(self, state: dict) -> None:
        if state["num_tasks"] != len(self.tasks):
            raise ValueError(f"the checkpoint was taken with {state['num_tasks']} training tasks, the environment now "
                             f"has {len(self.tasks)}: resume needs the same data (or checkpoint.resume=never)")
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])

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
