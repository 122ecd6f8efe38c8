"""The SDPO loop. One step: sample and verify, build teacher contexts, learn (the teacher update
happens inside the learner), sync weights. The driver holds no weights; it moves token ids and
file paths between actors. With ``rollout.max_staleness`` >= 1 the sampling, verifying and teacher
contexts of the next batches run in a thread of their own (sdpo/async_rollout.py) while a step learns.

``train`` is the whole loop and reads top to bottom; ``Run`` holds the run's parts and does one
job per method. However the run ends (done, an exception, Ctrl-C, SIGTERM), ``Run.close`` stops the
actors, removes the weight files from /dev/shm and closes the metrics file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import random
import shlex
import shutil
import signal
import threading
import time
from pathlib import Path

import ray
import torch.distributed as dist

from environments import Task, Verdict, is_multi_turn, load_environment
from sdpo.async_rollout import AsyncRollouts
from sdpo.batch import TrainSample, build_batch
from sdpo.chat import bind_template_kwargs, chat_ids
from sdpo.checkpoint import Checkpoints, size_bytes, step_of, truncate_metrics
from sdpo.cluster import colocated_placement_group, start_ray
from sdpo.config import Config
from sdpo.env_pool import EnvPool
from sdpo.episodes import Episode, EpisodeLimits, run_episodes
from sdpo.learner.group import LearnerGroup, LearnerTimeout
from sdpo.metrics import PhaseTimer, RunLogger
from sdpo.models import load_tokenizer, resolve_model_path, stop_token_ids
from sdpo.probe import probe_teacher
from sdpo.recipe import to_yaml
from sdpo.rollout.base import Completion, Sampling
from sdpo.rollout.pool import RolloutPool
from sdpo.teacher_guard import TeacherGuard
from sdpo.weight_sync.files import default_weights_dir

# What a learner call raises when a rank is gone (or failed on its own: restart_learners tells them apart).
LEARNER_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, LearnerTimeout)


def train(cfg: Config, environment: tuple | None = None) -> dict:
    """``environment``: (env, tasks by split) already built and read (by ``sdpo.run``'s checks), else built here."""
    run = Run(cfg, environment)
    try:
        run.start()
        step = run.restore(run.resume_from)
        if run.before is None:
            run.before = run.evaluate(0)
            run.probe(0)
        while step < cfg.steps:
            step += 1
            timer, started = PhaseTimer(), time.perf_counter()
            rollouts, batch, teacher_stats = run.next_batch(step, timer)  # max_staleness >= 1: sampled ahead
            try:
                learn_stats = run.learn(batch, timer)
                run.sync(step, timer)
            except LEARNER_FAILURES as err:
                step = run.restart_learners(err, step)  # re-raises unless a learner rank was lost
                continue
            run.log_step(step, rollouts, {**teacher_stats, **learn_stats}, timer, started)
            last = step == cfg.steps
            with run.paused(step):  # max_staleness >= 1: the engines hold this step's weights and sample nothing newer
                if due(step, cfg.eval.every_steps) and not last:  # the last step's evaluation follows the loop
                    run.evaluate(step)
                if due(step, cfg.eval.teacher_probe_every_steps) or last:
                    run.probe(step)
                if due(step, cfg.checkpoint.every_steps) or last:
                    run.save(step)
        return run.finish(run.evaluate(cfg.steps) if cfg.steps else run.before)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (see Run.start)
        raise run.interrupted(err) from None
    finally:
        run.close()


def due(step: int, every: int) -> bool:
    """Whether a periodic action (evaluate, probe, checkpoint) runs after ``step``; every=0: never."""
    return bool(every) and step % every == 0


@dataclasses.dataclass
class Rollouts:
    """``n`` sampled completions per task, decoded and verified. ``verdicts`` is flat, in sample order."""

    tasks: list[Task]
    prompt_ids: list[list[int]]
    groups: list[list[Completion]]
    verdicts: list[Verdict]
    n: int

    def verdicts_by_group(self) -> list[list[Verdict]]:
        return [self.verdicts[i * self.n : (i + 1) * self.n] for i in range(len(self.tasks))]

    def success_frac(self, threshold: float) -> float:
        return sum(v.reward >= threshold for v in self.verdicts) / len(self.verdicts)


class Run:
    """The parts of one run (config, tokenizer, rollout pool, verifier pool, learner group,
    checkpoints, logger, prompt sampler) and what a step does with them."""

    def __init__(self, cfg: Config, environment: tuple | None = None):
        """The parts that need no Ray; ``start`` makes the actors."""
        self.cfg = cfg
        env, tasks_by_split = environment or (load_environment(cfg.environment.name, cfg.environment.kwargs), {})
        self.env = env  # tasks and tools; multi-turn episodes step in the verifier actors (self.envs)
        split_tasks = {split: tasks_by_split.get(split) or list(env.tasks(split))
                       for split in {cfg.environment.train_split, cfg.environment.eval_split}}
        self.train_tasks, held_out = split_tasks[cfg.environment.train_split], split_tasks[cfg.environment.eval_split]
        self.eval_tasks, self.probe_tasks = held_out[: cfg.eval.max_tasks], held_out[: cfg.eval.teacher_probe_tasks]
        self.model_path = resolve_model_path(cfg.model.path)
        self.tokenizer = bind_template_kwargs(load_tokenizer(self.model_path), cfg.model.chat_template_kwargs)
        self.stops = stop_token_ids(self.model_path, self.tokenizer)
        self.run_dir = make_run_dir(cfg)
        self.checkpoints = Checkpoints(cfg, self.run_dir)
        self.resume_from = self.checkpoints.latest() if cfg.checkpoint.resume == "auto" else None
        # Steps after the checkpoint are replayed, so their rows go; a fresh start drops everything.
        truncate_metrics(self.run_dir / "metrics.jsonl", after_step=step_of(self.resume_from) if self.resume_from else -1)
        self.log = RunLogger(cfg, self.run_dir)
        self.weights_dir = default_weights_dir(self.run_dir.name)
        remove_orphaned_weight_dirs(self.weights_dir)
        self.sampler = PromptSampler(self.train_tasks, cfg.seed)
        self.guard = TeacherGuard.from_config(cfg)  # teacher.guard: acts on the teacher probe's readings
        self.before: dict[str, float] | None = None  # held-out success before training
        self.step = 0  # the last step completed (what an interrupted run reports)
        self.restarts = 0
        self.started_ray = False
        self.colocated = self.rollout = self.envs = self.learners = None
        self.asynchronous = cfg.rollout.max_staleness > 0
        self.producer: AsyncRollouts | None = None  # the rollout thread (asynchronous mode), started by next_batch
        self._previous_sigterm = None

    def start(self) -> None:
        """Ray and the actors. SIGTERM (a job scheduler's stop) then ends the run like Ctrl-C: after
        ray.init, which installs a handler of its own that would exit without a word."""
        cfg = self.cfg
        self.started_ray = start_ray(cfg)
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        self.colocated = colocated_placement_group(cfg)  # None unless GPUs are shared by learner and rollout
        self.rollout, self.envs = RolloutPool(cfg, self.model_path, self.colocated), EnvPool(cfg.environment)
        self.learners = LearnerGroup(cfg, self.model_path, self.colocated)
        self.log.say(f"run dir {self.run_dir} | rollout engine: {self.rollout.engine_kind} x{cfg.rollout.replicas} | "
                     f"learner: {cfg.learner.world_size} FSDP2 ranks, {self.learners.num_params / 1e6:.2f}M params")

    def sample_and_verify(self, tasks: list[Task], n: int, temperature: float, seed: int,
                          timer: PhaseTimer | None = None, prompt_ids: list[list[int]] | None = None) -> Rollouts:
        """``n`` completions per task from the engines, decoded and scored by the verifiers.
        ``prompt_ids``: the prompts to answer (default: each task's own chat prompt)."""
        timer, cfg = timer or PhaseTimer(), self.cfg
        if is_multi_turn(self.env):  # episodes: generation and verification interleave, turn by turn
            return self.sample_episodes(tasks, n, temperature, seed, timer, prompt_ids)
        pending = []  # (prompt indices, verdicts in flight): verification starts as each replica's share arrives

        def verify_share(indices: list[int], groups: list[list[Completion]]) -> None:
            texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for g in groups for c in g]
            pending.append((indices, self.envs.submit([tasks[j] for j in indices for _ in range(n)], texts, group_size=n)))

        with timer("generate"):
            prompt_ids = prompt_ids or [chat_ids(self.tokenizer, t.messages) for t in tasks]
            groups = self.rollout.generate(prompt_ids, Sampling(n=n, temperature=temperature, top_p=cfg.rollout.top_p,
                                                                max_new_tokens=cfg.rollout.max_response_tokens,
                                                                stop_token_ids=self.stops, seed=seed), on_share=verify_share)
        with timer("verify"):  # what is left of it once the last share is generated
            by_prompt: list[list[Verdict]] = [[] for _ in tasks]
            for indices, verdicts in pending:
                flat = verdicts.result(count=False)
                for k, j in enumerate(indices):
                    by_prompt[j] = flat[k * n : (k + 1) * n]
            verdicts = [v for group in by_prompt for v in group]  # sample order, whatever order the shares came in
            self.envs.count(verdicts)  # one round, as if verified at once
        return Rollouts(tasks, prompt_ids, groups, verdicts, n)

    def next_batch(self, step: int, timer: PhaseTimer) -> tuple[Rollouts, list[TrainSample], dict[str, float]]:
        """Batch ``step``: sampled, verified and given teacher contexts now (max_staleness 0), or
        taken from the rollout thread that made it while earlier steps learned."""
        cfg = self.cfg
        if not self.asynchronous:
            tasks = self.sampler.next(cfg.prompts_per_step)
            rollouts = self.sample_and_verify(tasks, cfg.rollout.samples_per_prompt, cfg.rollout.temperature,
                                              seed=cfg.seed * 1_000_003 + step, timer=timer)
            with timer("teacher_contexts"):
                batch, teacher_stats = self.teacher_contexts(rollouts)
            return rollouts, batch, teacher_stats
        if self.producer is None:  # after a start, resume or learner restart: from the engines' version on
            self.producer = AsyncRollouts(self, step - 1, self.is_barrier)
        with timer("wait_for_batch"):
            item = self.producer.take(step)
        timer.seconds.update(item.seconds)  # its own phases, which overlapped earlier steps' learning
        return item.rollouts, item.batch, item.teacher_stats

    def is_barrier(self, step: int) -> bool:
        """Whether the engines must hold ``step``'s weights after it: it evaluates, probes or checkpoints."""
        cfg = self.cfg
        return (step == cfg.steps or due(step, cfg.eval.every_steps) or due(step, cfg.eval.teacher_probe_every_steps)
                or due(step, cfg.checkpoint.every_steps))

    @contextlib.contextmanager
    def paused(self, step: int):
        """Asynchronous mode: at a barrier the block has the engines (the rollout thread waits); after
        it, sampling may go past ``step``. Synchronous: nothing to do."""
        producer = self.producer
        if producer is None:
            yield
            return
        try:
            if self.is_barrier(step):
                with producer.engines:
                    yield
            else:
                yield
        finally:
            producer.release(step)

    def _stop_producer(self) -> None:
        if self.producer is not None:
            self.producer.stop()
            self.producer = None

    def sample_episodes(self, tasks: list[Task], n: int, temperature: float, seed: int, timer: PhaseTimer,
                        prompt_ids: list[list[int]] | None = None) -> Rollouts:
        """``n`` multi-turn episodes per task (SPEC 2a), each one sample with its final Verdict."""
        cfg, env_cfg = self.cfg, self.cfg.environment
        limits = EpisodeLimits(env_cfg.max_turns_per_episode, env_cfg.max_tokens_per_episode or cfg.rollout.max_response_tokens,
                               env_cfg.tool_timeout_s, self.rollout.settings.max_model_len)
        sampling = Sampling(n=n, temperature=temperature, top_p=cfg.rollout.top_p, max_new_tokens=limits.max_tokens,
                            stop_token_ids=self.stops, seed=seed)
        with timer("episodes"):  # the environment's start and step run in the verifier actors
            groups = run_episodes(self.rollout.generate, self.tokenizer, self.env, tasks, sampling, limits, prompt_ids,
                                  steps=self.envs)
        verdicts = [e.verdict for g in groups for e in g]
        self.envs.count(verdicts)  # verifier failures on final answers count as in single-turn verification
        return Rollouts(tasks, [g[0].prompt_ids for g in groups], groups, verdicts, n)

    def teacher_contexts(self, rollouts: Rollouts, context_cfg=None) -> tuple[list[TrainSample], dict[str, float]]:
        return build_batch(rollouts.tasks, rollouts.prompt_ids, rollouts.groups, rollouts.verdicts_by_group(),
                           self.tokenizer, context_cfg or self.cfg.teacher_context, self.cfg.loss.advantage_std_normalize,
                           tools=getattr(self.env, "tools", None) or None)

    def learn(self, batch: list[TrainSample], timer: PhaseTimer) -> dict[str, float]:
        with timer("learn"):
            self.rollout.prepare_for_training()  # colocated GPUs: the engines sleep while the learner trains
            return self.learners.train_step(batch)  # teacher + student forwards, loss, step, teacher update

    def sync(self, step: int, timer: PhaseTimer) -> None:
        producer = self.producer
        with timer("weight_sync"):
            if producer is None:
                self.rollout.sync_weights(self.learners, step, self.weights_dir)  # shm file, NCCL broadcast or CUDA IPC
            elif self.rollout.transport == "shm" and not self.is_barrier(step):
                with producer.files:  # the learner writes the file; the rollout thread loads it between batches
                    producer.publish(self.learners.export_weights(self.weights_dir, step), step)
            else:  # a barrier, or a broadcast the engines must take part in: after the batch in flight
                with producer.engines:
                    self.rollout.sync_weights(self.learners, step, self.weights_dir)
                producer.publish(None, step)

    def serve_weights(self, step: int, teacher: bool = False) -> None:
        """The engines answer with the teacher's weights (or the student's again), through a file."""
        directory = self.weights_dir + ("-teacher" if teacher else "")
        if self.rollout.adapters:  # LoRA adapter-only sync: the teacher's (or student's) adapters on the same base
            self.rollout.load_adapter(self.learners.call("adapter_payload", teacher)[0], step, directory)
            return
        self.rollout.load_weights(self.learners.export_weights(directory, step, teacher=teacher), version=step)

    def evaluate(self, step: int) -> dict[str, float]:
        cfg, results = self.cfg, {}
        modes = [("t", cfg.eval.temperature, cfg.eval.samples_per_task)] + ([("greedy", 0.0, 1)] if cfg.eval.greedy else [])
        for name, temperature, n in modes:
            rollouts = self.sample_and_verify(self.eval_tasks, n, temperature, seed=10_000_019 + cfg.seed)
            results[f"eval/success_{name}"] = rollouts.success_frac(cfg.teacher_context.success_threshold)
            results.update(env_metrics(rollouts.verdicts, "eval/{}_" + name))
        self.log.log(step, results)
        return results

    def probe(self, step: int) -> None:
        if self.cfg.eval.teacher_probe_every_steps:
            probe = probe_teacher(self, self.probe_tasks, step)
            self.log.log(step, {**probe, **self.guard.apply(step, probe, self.learners, self.log.say)})

    def save(self, step: int) -> None:
        path, seconds = self.checkpoints.save(step, self.learners, {"step": step, "sampler": self.sampler.state(),
                                                                    "before": self.before, "guard": self.guard.state()})
        self.log.log(step, {"checkpoint/seconds": seconds, "checkpoint/bytes": float(size_bytes(path))})

    def restore(self, path: Path | None) -> int:
        """Learners, engine weights and data position as of checkpoint ``path`` (None: the start).
        Returns the step to continue after."""
        self._stop_producer()  # the rollout thread starts again at the next batch, from what is restored
        self.sampler, self.step = PromptSampler(self.train_tasks, self.cfg.seed), 0
        if path is None:
            self.guard.load_state(None, self.learners)
            return 0
        self.learners.call("load_checkpoint", str(path))
        state = self.checkpoints.load_driver_state(path)
        self.guard.load_state(state.get("guard"), self.learners)
        self.sampler.load_state(state["sampler"])
        self.rollout.sync_weights(self.learners, state["step"], self.weights_dir)  # by the run's transport (a file only with shm)
        self.before, self.step = state["before"], state["step"]
        self.log.say(f"resumed from {path} (step {state['step']})")
        return state["step"]

    def restart_learners(self, err: Exception, step: int) -> int:
        """A new learner group from the last checkpoint (or the initial model), the engine reset to
        match. A rank died, a survivor failed in a collective with it, or one hangs: FSDP cannot go
        on without it. Any other error is a bug or bad input, which a restart would only repeat, so
        it is raised again. Returns the step to continue after."""
        if not learner_lost(err):
            raise err
        self._stop_producer()  # before the engines are reset below
        cfg, latest = self.cfg, self.checkpoints.latest()
        if self.restarts >= cfg.checkpoint.max_learner_restarts:
            raise RuntimeError(f"a learner rank was lost {self.restarts + 1} times; the last checkpoint is "
                               f"{latest}: run the same command to resume from it") from err
        self.restarts += 1
        started = time.perf_counter()
        self.log.say(f"learner rank lost at step {step} ({type(err).__name__}); restarting the learner group from "
                     f"{latest or 'the initial model'} ({self.restarts}/{cfg.checkpoint.max_learner_restarts})")
        self.learners.shutdown()
        self.learners = LearnerGroup(cfg, self.model_path, self.colocated)
        truncate_metrics(self.run_dir / "metrics.jsonl", after_step=step_of(latest))  # the replayed steps log again
        if latest is None:
            self.rollout.sync_weights(self.learners, 0, self.weights_dir)  # nccl: rebuilds the weight group for the new rank 0
        self.log.log(step_of(latest), {"learner/restarts": float(self.restarts),
                                       "learner/restart_s": time.perf_counter() - started})
        return self.restore(latest)

    def log_step(self, step: int, rollouts: Rollouts, stats: dict[str, float], timer: PhaseTimer, started: float) -> None:
        step_s, self.step = time.perf_counter() - started, step
        self.log.log(step, {**rollout_stats(rollouts, self.cfg, step), **stats, **timer.seconds, "time/step_s": step_s,
                            "throughput/tokens_per_s": stats["learn/response_tokens"] / step_s})

    def finish(self, after: dict[str, float]) -> dict:
        """The final model folder and the before/after summary of a run that completed."""
        if self.cfg.model.lora.enabled:  # the adapters as a PEFT folder (on model.path as base), always
            self.learners.call("export_adapter", str(self.run_dir / "final_adapter"))
        if self.cfg.checkpoint.export_hf:  # LoRA: the adapters merged into the base
            export_hf(self.learners, self.model_path, self.run_dir / "final_model")
        before = self.before
        self.log.say("held-out success  " + "  ".join(f"{k.split('/')[1]}: {before[k]:.3f} -> {after[k]:.3f}" for k in before))
        return {"before": before, "after": after, "run_dir": str(self.run_dir)}

    def interrupted(self, err: KeyboardInterrupt) -> Interrupted:
        return Interrupted(self.cfg, self.run_dir, self.checkpoints.latest(), self.step,
                           err.signum if isinstance(err, Interrupted) else signal.SIGINT)

    def close(self) -> None:
        """Everything the run holds goes, whichever way it ended; each part even when another fails."""
        errors = []
        if self.producer is not None:
            self.producer.stop(wait_s=0)  # no new batches; the one in flight fails once its actors are gone
        for name, release in (("metrics file", self.log.close),
                              ("learners", self.learners and self.learners.shutdown),
                              ("rollout engines", self.rollout and self.rollout.shutdown),
                              ("verifiers", self.envs and self.envs.shutdown),
                              ("weight files", self._remove_weight_files),
                              ("ray", self.started_ray and ray.shutdown)):
            try:
                if release:
                    release()
            except Exception as err:  # noqa: BLE001 -- report it, release the rest
                errors.append(f"{name}: {type(err).__name__}: {err}")
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if self.producer is not None:
            self.producer.thread.join(10)
        self.learners = self.rollout = self.envs = self.producer = None
        self.started_ray = False
        if errors:
            self.log.say("clean-up failed for " + "; ".join(errors))

    def _remove_weight_files(self) -> None:
        for directory in (self.weights_dir, self.weights_dir + "-teacher"):  # RAM in /dev/shm: nothing needs it after the run
            shutil.rmtree(directory, ignore_errors=True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run (after clean-up): where it got to, and how to go on."""

    def __init__(self, cfg: Config | None = None, run_dir: Path | None = None, checkpoint: Path | None = None,
                 step: int = 0, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.cfg, self.run_dir, self.checkpoint, self.step, self.signum = cfg, run_dir, checkpoint, step, signum

    def resume_hint(self, recipe: str, overrides: list[str]) -> str:
        """One line: the last checkpoint and the command that continues from it."""
        name = signal.Signals(self.signum).name
        if self.run_dir is None:
            return f"stopped by {name} before training began"
        kept = [o for o in overrides if not o.startswith(("logging.run_dir=", "checkpoint.resume="))]
        command = shlex.join(["python", "-m", "sdpo.run", recipe, *kept, f"logging.run_dir={self.run_dir}",
                              *(["checkpoint.resume=auto"] if self.cfg.checkpoint.resume != "auto" else [])])
        where = f"last checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint yet (it starts over)"
        return f"stopped by {name} after step {self.step}; {where}; resume: {command}"


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum=signum)


def remove_orphaned_weight_dirs(weights_dir: str) -> None:
    """A run killed outright (SIGKILL, the OOM killer) cannot clean up after itself: the next run of
    the same name (its resume) removes the weight directories whose process is gone. The process id
    ends each name (weight_sync.files.default_weights_dir)."""
    prefix = weights_dir.rpartition("-")[0] + "-"
    for path in glob.glob(glob.escape(prefix) + "*"):
        pid = path[len(prefix):].removesuffix("-teacher")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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

    learners.call("export_hf", str(directory))
    AutoConfig.from_pretrained(model_path).save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(directory)
    generation = Path(model_path) / "generation_config.json"
    if generation.exists():
        shutil.copy(generation, directory / generation.name)


def rollout_stats(rollouts: Rollouts, cfg: Config, step: int) -> dict[str, float]:
    rewards = [v.reward for v in rollouts.verdicts]
    lengths = [len(c.token_ids) for g in rollouts.groups for c in g]
    failures = sum(1 for v in rollouts.verdicts if v.info.get("verifier_failure"))
    # Staleness: how many versions the sampling policy is behind the one that learns (step s learns with v s-1).
    staleness = [(step - 1) - c.policy_version for g in rollouts.groups for c in g]
    k = cfg.rollout.max_staleness
    histogram = {f"rollout/staleness_frac_{i}": staleness.count(i) / len(staleness) for i in range(k + 1)} if k else {}
    return {
        "rollout/staleness_mean": sum(staleness) / len(staleness),
        "rollout/staleness_max": float(max(staleness)),
        **histogram,
        # Synchronous training samples step s with the weights of step s-1: the lag must read 0
        # (asynchronous: at most rollout.max_staleness; the same number as rollout/staleness_max).
        "rollout/policy_version_lag_max": float((step - 1) - min(c.policy_version for g in rollouts.groups for c in g)),
        "rollout/reward_mean": sum(rewards) / len(rewards),
        "rollout/success_frac": sum(r >= cfg.teacher_context.success_threshold for r in rewards) / len(rewards),
        "rollout/response_tokens_mean": sum(lengths) / len(lengths),
        "verify/failures": float(failures),
        **episode_stats(rollouts),
        **env_metrics(rollouts.verdicts, "env/{}"),
    }


def env_metrics(verdicts: list[Verdict], key: str) -> dict[str, float]:
    """The environment's own per-sample numbers (``Verdict.info["metrics"]``), each averaged over the
    samples that report it, under ``key.format(name)``."""
    values: dict[str, list[float]] = {}
    for v in verdicts:
        for name, value in v.info.get("metrics", {}).items():
            values.setdefault(name, []).append(float(value))
    return {key.format(name): sum(vs) / len(vs) for name, vs in sorted(values.items())}


def episode_stats(rollouts: Rollouts) -> dict[str, float]:
    """Multi-turn runs: model turns per episode, and how episodes ended other than by a verified
    final answer (tool_error, tool_timeout, turn_limit, token_limit, start_error), as fractions."""
    episodes = [c for g in rollouts.groups for c in g if isinstance(c, Episode)]
    if not episodes:
        return {}
    ends = [v.info.get("episode_end") for v in rollouts.verdicts]
    return {"episode/turns_mean": sum(e.turns for e in episodes) / len(episodes),
            **{f"episode/ended_{why}_frac": ends.count(why) / len(ends) for why in sorted({e for e in ends if e})}}


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
