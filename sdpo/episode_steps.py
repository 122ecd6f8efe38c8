"""The environment's side of an episode: ``start`` and ``step`` of a multi-turn environment
(environments/multi_turn.py), each ``step`` in a thread with its own deadline.

The trainer runs these in the verifier actors (``EnvPool.start_episodes`` / ``step_episodes``), so
that a user's tool never runs in the driver and one that hangs or kills its process takes only a
verifier with it. ``LocalSteps`` runs the same code in this process (the tiny model's warm start,
tests). Either way an episode's state travels with each call and comes back with the result, so it
must pickle; the pool sends every step of one episode to the same verifier process, so a state may
also name that process's files.

Outcomes (SPEC 2a): a tool that raises or runs past its deadline ends the episode with reward 0 and
feedback the teacher may use; a final answer whose verification raises or hangs gets no verdict (a
verifier failure: no feedback, no teacher signal), as in single-turn verification.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

from environments import Task, Verdict
from environments.base import verdict_problem


def ended(feedback: str, why: str) -> Verdict:
    """An episode that ended without a scored final answer, through the model's own doing."""
    return Verdict(0.0, feedback=feedback, info={"episode_end": why})


def no_verdict(error: str, kind: str) -> Verdict:
    """The environment failed, not the model: reward 0, no feedback (what sdpo/env_pool.py scores any
    verifier failure)."""
    return Verdict(0.0, feedback=None, info={"verifier_failure": kind, "verifier_error": error})


def start_all(env: Any, tasks: list[Task]) -> list[Any]:
    """``env.start(task)`` for each episode: its state, or a Verdict that ends it at once."""
    out: list[Any] = []
    for task in tasks:
        try:
            out.append(env.start(task))
        except Exception as err:  # noqa: BLE001 -- a broken start() scores 0 with feedback, like a tool
            out.append(ended(f"the environment failed to start the episode: {type(err).__name__}: {err}", "start_error"))
    return out


def step_all(env: Any, calls: list[tuple[Any, dict[str, Any]]], timeout_s: float) -> list[tuple[Any, Any]]:
    """``env.step`` on every (state, message) at once, each in a daemon thread with its own deadline.
    Malformed tool calls are answered without calling the environment. Returns (tool messages or a
    Verdict, the state after the step) per call."""
    results: list[Any] = [None] * len(calls)
    threads = []

    def run(i: int, state: Any, message: dict[str, Any]) -> None:
        try:
            out = env.step(state, message)
            if inspect.isawaitable(out):
                out = asyncio.run(_awaited(out))
            results[i] = _checked(out)
        except Exception as err:  # noqa: BLE001 -- a tool's failure is the episode's end, not the run's
            results[i] = failed_step(message, f"{type(err).__name__}: {err}", "error")

    for i, (state, message) in enumerate(calls):
        bad = [c for c in message.get("tool_calls", []) if c.get("error")]
        if bad:
            results[i] = [{"role": "tool", "name": c.get("name") or "error", "content": f"invalid tool call: {c['error']}"}
                          for c in bad]
            continue
        thread = threading.Thread(target=run, args=(i, state, message), daemon=True, name=f"sdpo-episode-step-{i}")
        thread.start()
        threads.append((i, thread))
    for i, thread in threads:
        thread.join(timeout_s)  # the deadlines overlap: all steps run at once
        if thread.is_alive():
            results[i] = failed_step(calls[i][1], f"it did not finish within {timeout_s:g} s", "timeout")
    return [(result, state) for result, (state, _) in zip(results, calls)]


def failed_step(message: dict[str, Any], why: str, kind: str) -> Verdict:
    """A step that raised or hung. On a turn with tool calls the tool failed: the episode ends with
    reward 0 and feedback the teacher may use. On a final answer it is the verifier that failed."""
    if message.get("tool_calls"):
        return ended(f"the tool call failed: {why}", f"tool_{kind}")
    return no_verdict(f"verify() of the final answer: {why}", kind)


class LocalSteps:
    """Episode steps in this process's threads (what the verifier actors run, without the actors)."""

    def __init__(self, env: Any):
        self.env = env

    def start_episodes(self, tasks: list[Task], keys: list[int]) -> list[Any]:
        return start_all(self.env, tasks)

    def step_episodes(self, calls: list[tuple[Any, dict[str, Any]]], keys: list[int], timeout_s: float) -> list[tuple[Any, Any]]:
        return step_all(self.env, calls, timeout_s)


async def _awaited(awaitable):
    return await awaitable


def _checked(out: Any) -> list[dict[str, Any]] | Verdict:
    if isinstance(out, Verdict):  # a NaN or out-of-range reward must not reach the advantages
        problem = verdict_problem(out)
        return no_verdict(f"step() returned an invalid verdict: {problem}", "invalid") if problem else out
    if isinstance(out, str):
        out = [{"role": "tool", "content": out}]
    if not isinstance(out, list) or not out or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in out):
        raise TypeError(f"step() must return a Verdict or a non-empty list of tool messages "
                        f"({{'role': 'tool', 'content': str}}), got {out!r:.120}")
    return [{"role": "tool", **m} for m in out]
