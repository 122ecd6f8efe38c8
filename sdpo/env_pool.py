"""Verification as a pool of Ray actors (CPU). A verifier call that raises, hangs, dies or returns
anything but a valid Verdict scores 0 with no feedback and no teacher signal (a verifier's failure
is not something the student did, so it must never reach the teacher as "feedback");
``info["verifier_failure"]`` says which failure and ``info["verifier_error"]`` the message. Each
verification round that has failures prints one line, and a run whose verifier fails on every call
of a round, or on more than ``environment.max_verifier_failure_frac`` of the calls of the last
``environment.verifier_failure_window_rounds`` rounds, stops with ``VerifierFailing``.

Work goes to the workers in contiguous chunks cut at group boundaries (all samples of one prompt
stay on one worker), so that the environment's optional ``review_group`` hook sees whole groups.
Inside a worker up to ``Environment.max_concurrency`` calls run at once; each has its own deadline
(``environment.timeout_s_per_call``) counted from when it starts.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import os
import threading
import time
from typing import Any

import ray

from environments import Environment, Task, Verdict, load_environment
from environments.base import has_no_verdict, verdict_problem
from sdpo.cluster import start_actor
from sdpo.config import EnvironmentConfig
from sdpo.episode_steps import no_verdict, start_all, step_all

# How long past environment.tool_timeout_s a verifier may take to answer a round of episode steps
# (its own deadline has passed by then) before it counts as stuck and is restarted.
EPISODE_CALL_SLACK_S = 30.0
EPISODE_START_TIMEOUT_S = 300.0

# A round this small (a one-task evaluation) failing whole says little: the window decides instead.
MIN_CALLS_TO_JUDGE_ONE_ROUND = 4


class VerifierFailing(RuntimeError):
    """The verifier failed on too many calls for the run to mean anything: every such sample scores 0
    and teaches nothing, so going on would only look like a healthy run."""


failed = no_verdict  # reward 0, no feedback, the failure's kind and message in info


class EnvWorker:
    """One verifier process: builds the environment once, then verifies batches."""

    def __init__(self, name: str, kwargs: dict):
        self.env: Environment = load_environment(name, kwargs)
        self.concurrency = max(1, int(getattr(self.env, "max_concurrency", 1)))

    def verify(self, tasks: list[Task], completions: list[str], timeout_s: float,
               group_size: int | None = None) -> list[Verdict]:
        if inspect.iscoroutinefunction(self.env.verify):
            verdicts = self._verify_async(tasks, completions, timeout_s)
        else:
            verdicts = self._verify_threads(tasks, completions, timeout_s)
        return self._review_groups(tasks, completions, verdicts, group_size)

    def _verify_threads(self, tasks: list[Task], completions: list[str], timeout_s: float) -> list[Verdict]:
        # A thread per call (not a pool): a hung verify() is abandoned at its deadline and its thread
        # may never return, so it must not hold a slot that later calls wait for.
        results: list[Any] = [None] * len(tasks)
        done = threading.Condition()
        running: dict[int, float] = {}
        next_index = 0

        def call(i: int) -> None:
            try:
                outcome: Any = self.env.verify(tasks[i], completions[i])
                if inspect.isawaitable(outcome):
                    outcome = asyncio.run(outcome)
            except BaseException as err:  # noqa: BLE001 -- the user's verifier: anything becomes a 0
                outcome = err
            with done:
                if results[i] is None:
                    results[i] = _checked(outcome)
                done.notify()

        with done:
            while next_index < len(tasks) or running:
                while next_index < len(tasks) and len(running) < self.concurrency:
                    running[next_index] = time.monotonic()
                    threading.Thread(target=call, args=(next_index,), daemon=True).start()
                    next_index += 1
                now = time.monotonic()
                for i, started in list(running.items()):
                    if results[i] is not None:
                        del running[i]
                    elif now - started >= timeout_s:
                        results[i] = failed(f"verify() timed out after {timeout_s:g} s (environment.timeout_s_per_call)", "timeout")
                        del running[i]
                if running:
                    first_deadline = min(running.values()) + timeout_s
                    done.wait(timeout=max(0.0, first_deadline - time.monotonic()) + 1e-3)
        return results

    def _verify_async(self, tasks: list[Task], completions: list[str], timeout_s: float) -> list[Verdict]:
        async def one(i: int, gate: asyncio.Semaphore) -> Verdict:
            async with gate:
                try:
                    return _checked(await asyncio.wait_for(self.env.verify(tasks[i], completions[i]), timeout_s))
                except asyncio.TimeoutError:
                    return failed(f"verify() timed out after {timeout_s:g} s (environment.timeout_s_per_call)", "timeout")
                except Exception as err:  # noqa: BLE001
                    return _checked(err)

        async def all_of_them() -> list[Verdict]:
            gate = asyncio.Semaphore(self.concurrency)
            return list(await asyncio.gather(*(one(i, gate) for i in range(len(tasks)))))

        return asyncio.run(all_of_them())

    def _review_groups(self, tasks: list[Task], completions: list[str], verdicts: list[Verdict],
                       group_size: int | None) -> list[Verdict]:
        if type(self.env).review_group is Environment.review_group:
            return verdicts
        out: list[Verdict] = []
        for a, b in group_bounds(tasks, group_size):
            group = verdicts[a:b]
            if any(has_no_verdict(v) for v in group):  # the hook cannot compare what was never scored
                out += group
                continue
            try:
                reviewed = self.env.review_group(tasks[a], completions[a:b], group)
                if not isinstance(reviewed, (list, tuple)) or len(reviewed) != b - a:
                    raise TypeError(f"review_group must return {b - a} Verdicts, got {reviewed!r:.200}")
                problems = [p for p in map(verdict_problem, reviewed) if p]
                if problems:
                    raise TypeError(f"review_group returned an invalid verdict: {problems[0]}")
            except Exception as err:  # noqa: BLE001 -- keep the per-sample verdicts, flag the failure
                reviewed = [dataclass_replace_info(v, "group_hook", f"{type(err).__name__}: {err}") for v in group]
            out += reviewed
        return out

    def start_episodes(self, tasks: list[Task]) -> list[Any]:
        return start_all(self.env, tasks)

    def step_episodes(self, calls: list[tuple[Any, dict]], timeout_s: float) -> list[tuple[Any, Any]]:
        return step_all(self.env, calls, timeout_s)

    def pid(self) -> int:
        return os.getpid()


def _checked(outcome: Any) -> Verdict:
    if isinstance(outcome, BaseException):
        return failed(f"verify() raised {type(outcome).__name__}: {outcome}", "error")
    problem = verdict_problem(outcome)  # also a Verdict changed after it was made (v.reward = nan)
    return failed(problem, "invalid") if problem else outcome


def dataclass_replace_info(verdict: Verdict, kind: str, message: str) -> Verdict:
    return Verdict(reward=verdict.reward, feedback=verdict.feedback,
                   info={**verdict.info, "verifier_failure": kind, "verifier_error": message})


def group_bounds(tasks: list[Task], group_size: int | None = None) -> list[tuple[int, int]]:
    """[start, end) of each group: fixed ``group_size`` when given, else each run of consecutive
    samples of the same task (one prompt's group)."""
    if group_size:
        if len(tasks) % group_size:
            raise ValueError(f"verify: {len(tasks)} samples do not split into groups of {group_size}")
        return [(a, a + group_size) for a in range(0, len(tasks), group_size)]
    bounds, start = [], 0
    for i in range(1, len(tasks) + 1):
        if i == len(tasks) or tasks[i] is not tasks[start] and tasks[i].id != tasks[start].id:
            bounds.append((start, i))
            start = i
    return bounds


def chunks_at_groups(tasks: list[Task], parts: int, group_size: int | None = None) -> list[tuple[int, int]]:
    """Split into at most ``parts`` contiguous chunks of about equal size, cutting only between groups."""
    groups = group_bounds(tasks, group_size)
    if not groups:
        return []
    target = len(tasks) / min(parts, len(groups))
    chunks, start = [], 0
    for _, end in groups:
        if end - start >= target * 0.999 or end == len(tasks):
            chunks.append((start, end))
            start = end
    return chunks


def absolute_file_path(name: str) -> str:
    """``rel/path.py:Class`` -> an absolute path, since a Ray worker's working directory may differ."""
    module, sep, cls = name.rpartition(":")
    if sep and module.endswith(".py") and not os.path.isabs(module):
        return f"{os.path.abspath(os.path.expanduser(module))}:{cls}"
    return name


class PendingVerdicts:
    """Verification in flight (``EnvPool.submit``); ``result()`` waits and returns verdicts in order."""

    def __init__(self, pool: "EnvPool", refs: list, chunks: list[tuple[int, int]]):
        self.pool, self.refs, self.chunks = pool, refs, chunks

    def result(self, count: bool = True) -> list[Verdict]:
        """count=False: the caller counts the round's failures itself (one round sent in several parts)."""
        verdicts: list[Verdict] = []
        for index, (ref, (a, b)) in enumerate(zip(self.refs, self.chunks)):
            try:
                verdicts += ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker process died; max_restarts revives it
                verdicts += [failed(f"the verifier process died ({type(err).__name__})", "crash") for _ in range(b - a)]
                self.pool.restarting.add(index)
        if count:
            self.pool.count(verdicts)
        return verdicts


class FailureWatch:
    """Counts verifier failures by kind, prints each round's, and raises VerifierFailing when the
    verifier fails on every call of a round or on too many over the last few rounds."""

    def __init__(self, cfg: EnvironmentConfig):
        self.cfg = cfg
        self.failures: dict[str, int] = {}
        self.rounds: collections.deque = collections.deque(maxlen=cfg.verifier_failure_window_rounds)  # (no verdict, calls)

    def record(self, verdicts: list[Verdict]) -> None:
        kinds: dict[str, int] = {}
        for v in verdicts:
            kind = v.info.get("verifier_failure")
            if kind:
                kinds[kind] = kinds.get(kind, 0) + 1
                self.failures[kind] = self.failures.get(kind, 0) + 1
        if not kinds:
            self.rounds.append((0, len(verdicts)))
            return
        first = next(v.info.get("verifier_error", "") for v in sorted(verdicts, key=lambda v: not has_no_verdict(v))
                     if v.info.get("verifier_failure"))
        summary = ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
        _say(f"verifier: {sum(kinds.values())} of {len(verdicts)} calls failed ({summary}); first: {first:.300}")
        void = sum(1 for v in verdicts if has_no_verdict(v))
        self.rounds.append((void, len(verdicts)))
        limit = self.cfg.max_verifier_failure_frac
        if limit >= 1.0 or not void:
            return
        advice = (f"fix the verifier (environment.name={self.cfg.name!r}), or raise "
                  f"environment.max_verifier_failure_frac (now {limit:g}; 1 never stops)")
        if void == len(verdicts) >= MIN_CALLS_TO_JUDGE_ONE_ROUND:
            raise VerifierFailing(f"the verifier failed on all {void} calls of one round ({summary}); the first: "
                                  f"{first:.300}. Every such sample scores 0 and teaches nothing: {advice}")
        failed_calls, calls = map(sum, zip(*self.rounds))
        if len(self.rounds) == self.rounds.maxlen and failed_calls > limit * calls:
            raise VerifierFailing(f"the verifier failed on {failed_calls} of the {calls} calls of the last "
                                  f"{len(self.rounds)} rounds (more than {limit:g}); the first of this round: "
                                  f"{first:.300}. Such samples score 0 and teach nothing: {advice}")


class EnvPool:
    def __init__(self, cfg: EnvironmentConfig):
        self.cfg = cfg
        self.name = absolute_file_path(cfg.name)
        self.workers = [start_actor(EnvWorker, (self.name, cfg.kwargs), num_cpus=cfg.num_cpus_per_worker, max_restarts=-1,
                                    max_task_retries=0) for _ in range(cfg.workers)]
        self.watch = FailureWatch(cfg)
        self.restarting: set[int] = set()  # workers whose process died; wait for them before new work

    def _wait_for_restarts(self) -> None:
        # A call sent while Ray still believes the dead process alive fails too; a ping that
        # succeeds means the restarted actor is taking calls again.
        for index in sorted(self.restarting):
            for _ in range(20):
                try:
                    ray.get(self.workers[index].pid.remote(), timeout=30)
                    break
                except (ray.exceptions.RayError, TimeoutError):
                    time.sleep(0.5)
        self.restarting.clear()

    def submit(self, tasks: list[Task], completions: list[str], group_size: int | None = None) -> PendingVerdicts:
        """Start verifying and return at once (overlap verification with other work).
        ``group_size``: samples per prompt, consecutive; without it, groups are runs of the same task."""
        if len(tasks) != len(completions):
            raise ValueError(f"verify: {len(tasks)} tasks but {len(completions)} completions")
        self._wait_for_restarts()
        chunks = chunks_at_groups(tasks, len(self.workers), group_size)
        refs = [w.verify.remote(tasks[a:b], completions[a:b], self.cfg.timeout_s_per_call, group_size)
                for w, (a, b) in zip(self.workers, chunks)]
        return PendingVerdicts(self, refs, chunks)

    def verify(self, tasks: list[Task], completions: list[str], group_size: int | None = None) -> list[Verdict]:
        """Verdicts in input order."""
        return self.submit(tasks, completions, group_size).result()

    def count(self, verdicts: list[Verdict]) -> None:
        self.watch.record(verdicts)

    # ---- multi-turn episodes (sdpo/episodes.py): start and step run here, never in the driver ----
    def start_episodes(self, tasks: list[Task], keys: list[int]) -> list[Any]:
        """Each episode's state (or the Verdict that ends it), started on worker ``key % workers``."""
        return self._on_workers("start_episodes", tasks, keys, EPISODE_START_TIMEOUT_S)

    def step_episodes(self, calls: list[tuple[Any, dict]], keys: list[int], timeout_s: float) -> list[tuple[Any, Any]]:
        """(tool messages or Verdict, state) per (state, message), each on worker ``key % workers``.
        The worker enforces ``timeout_s`` per step; a worker that does not answer shortly after that
        (stuck past Python's reach) is killed and restarted, and a worker that dies leaves its calls
        with no verdict: neither is something the model did."""
        out = self._on_workers("step_episodes", calls, keys, timeout_s + EPISODE_CALL_SLACK_S, timeout_s)
        return [r if isinstance(r, tuple) else (r, state) for r, (state, _) in zip(out, calls)]

    def _on_workers(self, method: str, items: list, keys: list[int], wait_s: float, *args: Any) -> list[Any]:
        """``method`` of the workers on ``items``, item i on worker ``keys[i] % workers``; results in
        item order, a no-verdict Verdict for each item of a worker that died or did not answer."""
        self._wait_for_restarts()
        parts: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            parts.setdefault(key % len(self.workers), []).append(i)
        refs = {w: getattr(self.workers[w], method).remote([items[i] for i in idx], *args) for w, idx in parts.items()}
        out: list[Any] = [None] * len(items)
        deadline = time.monotonic() + wait_s
        for w, idx in parts.items():
            try:
                got = ray.get(refs[w], timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                ray.kill(self.workers[w], no_restart=False)  # max_restarts=-1: it comes back for the next call
                self.restarting.add(w)
                got = [failed(f"the verifier process did not answer {method} within {wait_s:g} s", "timeout")] * len(idx)
            except ray.exceptions.RayError as err:  # the process died (a tool that killed it); it is restarted
                self.restarting.add(w)
                got = [failed(f"the verifier process died in {method} ({type(err).__name__})", "crash")] * len(idx)
            for i, result in zip(idx, got):
                out[i] = result
        return out

    @property
    def failures(self) -> dict[str, int]:
        return self.watch.failures

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []


def _say(text: str) -> None:
    from tqdm import tqdm  # through tqdm, so the line does not break the run's progress bar

    tqdm.write(text)
