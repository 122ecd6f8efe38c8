"""Asynchronous rollouts with bounded staleness (``rollout.max_staleness`` = K >= 1; SPEC section 9).

Why: synchronously, every step waits for generation, then verification, then learning, then the
weight sync, so on a cluster with separate rollout and learner GPUs one side idles while the other
works. Here a background thread samples, verifies and builds the teacher contexts of batches s+1 ..
s+K while the learner trains on batch s.

The rules (policy version v = the weights after v learner steps; batch s is learned by version s-1):
- Batch s is sampled by version >= s-1-K: the thread waits for that version before it starts the
  batch, so no sample older than K versions is ever learned from (``take`` checks it again).
- Weights reach the engines off the learner's path: after each step the learner writes its weights
  (``publish``) and goes on; the thread loads the newest written version between two batches. With
  a broadcast transport (nccl) the learner has to send while the engines receive, so there the sync
  waits for the batch in flight (``sync_now``).
- Barriers: after a step that evaluates, probes or checkpoints (and the last step) the thread samples
  nothing newer until the driver ``release``s it, and the engines hold that step's weights. So an
  evaluation sees exactly the step's policy, and a checkpoint's prompt-sampler state is the one after
  its own batch: a resumed run samples the same prompts for the same steps, with the checkpoint's
  weights (what the engines hold then) -- well defined, though, like any asynchronous run, the
  versions picked up later depend on timing.

Only this thread touches the rollout pool, the verifiers and the prompt sampler between barriers;
the driver touches them only while the thread is paused at one (``engines`` lock).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from sdpo.metrics import PhaseTimer


@dataclass
class Produced:
    """One batch, ready to learn from: what the synchronous loop makes inline each step."""

    step: int
    rollouts: object  # trainer.Rollouts
    batch: list  # TrainSample
    teacher_stats: dict[str, float]
    seconds: dict[str, float]  # its phases (generate, verify, teacher_contexts), overlapped with learning


class StalenessError(RuntimeError):
    """A batch older than rollout.max_staleness allows reached the learner: a bug, never a setting."""


class AsyncRollouts:
    def __init__(self, run, after_step: int, is_barrier):
        """``run``: the trainer's Run (its sampler, pool, verifiers, config); ``after_step``: the last
        step learned (the engines hold that version); ``is_barrier(step)``: whether the driver pauses
        sampling after ``step``."""
        self.run, self.cfg = run, run.cfg
        self.k = self.cfg.rollout.max_staleness
        self.is_barrier = is_barrier
        self.cond = threading.Condition()
        self.engines = threading.Lock()  # held by whoever uses the rollout pool / verifiers / sampler
        self.files = threading.Lock()  # a weight file is never replaced while it is being loaded
        self.published: tuple[str | None, int] = (None, after_step)  # newest weights the learner wrote
        self.released = after_step  # the driver is done with every step up to here
        self.ready: dict[int, Produced | BaseException] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._produce, args=(after_step + 1,), name="sdpo-rollouts", daemon=True)
        self.thread.start()

    # ---- the driver's side -------------------------------------------------------------------
    def take(self, step: int) -> Produced:
        """Batch ``step``, waiting for it; re-raises what went wrong in the thread."""
        with self.cond:
            self.cond.wait_for(lambda: step in self.ready or not self.thread.is_alive())
            item = self.ready.pop(step, None)
        if item is None:
            raise RuntimeError(f"the rollout thread ended before batch {step}")
        if isinstance(item, BaseException):
            raise item
        oldest = min(c.policy_version for g in item.rollouts.groups for c in g)
        if (step - 1) - oldest > self.k:
            raise StalenessError(f"batch {step} holds samples of policy v{oldest}, {(step - 1) - oldest} versions "
                                 f"behind the learner (rollout.max_staleness={self.k})")
        return item

    def publish(self, path: str | None, version: int) -> None:
        """The learner wrote ``version`` to ``path`` (None: the engines already hold it)."""
        with self.cond:
            self.published = (path, version)
            self.cond.notify_all()

    def release(self, step: int) -> None:
        """The driver is done with ``step`` (its evaluation, probe, checkpoint): sampling may go past it."""
        with self.cond:
            self.released = max(self.released, step)
            self.cond.notify_all()

    def stop(self, wait_s: float = 60.0) -> None:
        """No new batches; waits up to ``wait_s`` for the one in flight (its result is dropped)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if wait_s and self.thread is not threading.current_thread():
            self.thread.join(wait_s)

    # ---- the thread --------------------------------------------------------------------------
    def _may_start(self, step: int) -> bool:
        if step > self.cfg.steps:
            return False
        behind = self.published[1] < step - 1 - self.k  # its policy would be too old: wait for newer weights
        paused = any(self.is_barrier(s) for s in range(self.released + 1, step))
        return not behind and not paused

    def _produce(self, step: int) -> None:
        run, cfg = self.run, self.cfg
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopping or self._may_start(step))
                if self.stopping:
                    return
            try:
                timer = PhaseTimer()
                with self.engines:
                    self._load_newest(timer)
                    tasks = run.sampler.next(cfg.prompts_per_step)
                    rollouts = run.sample_and_verify(tasks, cfg.rollout.samples_per_prompt, cfg.rollout.temperature,
                                                     seed=cfg.seed * 1_000_003 + step, timer=timer)
                with timer("teacher_contexts"):
                    batch, teacher_stats = run.teacher_contexts(rollouts)
                item: Produced | BaseException = Produced(step, rollouts, batch, teacher_stats, timer.seconds)
            except BaseException as err:  # noqa: BLE001 -- handed to the driver, which raises it
                item = err
            with self.cond:
                if self.stopping:
                    return
                self.ready[step] = item
                self.cond.notify_all()
            if isinstance(item, BaseException):
                return
            step += 1

    def _load_newest(self, timer: PhaseTimer) -> None:
        """Between two batches: the engines take the newest weights the learner wrote."""
        started = time.perf_counter()
        with self.files:  # read and load under it: the learner's next write deletes this file
            with self.cond:
                path, version = self.published
            if path is None or version <= self.run.rollout.version:
                return
            self.run.rollout.load_weights(path, version)
        timer.seconds["time/weight_load_s"] = time.perf_counter() - started
