"""Verification as a pool of Ray actors. A verifier that raises, hangs or dies scores 0 with
feedback naming the failure; the run goes on and the failure is counted."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect

import ray

from environments import Task, Verdict, load_environment
from sdpo.config import EnvironmentConfig


class EnvWorker:
    def __init__(self, name: str, kwargs: dict):
        self.env = load_environment(name, kwargs)
        # One spare thread per call, so a hung verify() can be abandoned at its deadline.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)

    def verify(self, tasks: list[Task], completions: list[str], timeout_s: float) -> list[Verdict]:
        return [self._verify_one(t, c, timeout_s) for t, c in zip(tasks, completions)]

    def _verify_one(self, task: Task, completion: str, timeout_s: float) -> Verdict:
        future = self.pool.submit(self._call, task, completion)
        try:
            verdict = future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            return _failed(f"Verifier timed out after {timeout_s:g} s.", "timeout")
        except Exception as err:  # the user's verifier: anything it raises becomes a score of 0
            return _failed(f"Verifier error: {type(err).__name__}: {err}", "error")
        if not isinstance(verdict, Verdict):
            return _failed(f"Verifier returned {type(verdict).__name__}, expected Verdict.", "error")
        return verdict

    def _call(self, task: Task, completion: str) -> Verdict:
        result = self.env.verify(task, completion)
        return asyncio.run(result) if inspect.isawaitable(result) else result


def _failed(feedback: str, kind: str) -> Verdict:
    return Verdict(reward=0.0, feedback=feedback, info={"verifier_failure": kind})


class EnvPool:
    def __init__(self, cfg: EnvironmentConfig):
        self.cfg = cfg
        self.actor = ray.remote(EnvWorker).options(num_cpus=cfg.num_cpus_per_worker, max_restarts=-1)
        self.workers = [self.actor.remote(cfg.name, cfg.kwargs) for _ in range(cfg.workers)]

    def verify(self, tasks: list[Task], completions: list[str]) -> list[Verdict]:
        """Verdicts in input order. Work is split into one contiguous chunk per worker."""
        chunks = _chunks(len(tasks), len(self.workers))
        refs = [w.verify.remote(tasks[a:b], completions[a:b], self.cfg.timeout_s_per_call) for w, (a, b) in zip(self.workers, chunks)]
        verdicts: list[Verdict] = []
        for ref, (a, b) in zip(refs, chunks):
            try:
                verdicts += ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker process died (max_restarts revives it)
                verdicts += [_failed(f"Verifier crashed: {type(err).__name__}.", "crash")] * (b - a)
        return verdicts


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds
