"""The environment contract. Plain Python: no torch, no Ray, so a verifier can be read and tested alone.

An environment is a class named in the recipe by import path (``my_pkg.my_env:MyEnv``) and built
with the recipe's keyword arguments. It hands out tasks and verifies completions; the framework
does everything else (sampling, teacher contexts, learning).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence


@dataclasses.dataclass
class Task:
    """One prompt. ``messages`` is a chat (list of {"role", "content"}); ``data`` is whatever the
    verifier needs (an answer, tests, a tool schema); ``demonstration`` is an optional offline
    solution (SDFT)."""

    id: str
    messages: list[dict[str, str]]
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    demonstration: str | None = None


REWARD_RANGE = (0.0, 1.0)


@dataclasses.dataclass
class Verdict:
    """What ``verify`` returns. ``reward`` is a finite number in [0, 1] (``teacher_context.success_threshold``
    and the evaluation compare against it); ``feedback`` is text for the teacher or None; ``info`` is
    free-form, except ``info["metrics"]``: {name: finite number} the run averages over the samples that
    report it and logs as ``env/<name>`` each step and ``eval/<name>_<mode>`` at evaluations (partial
    credit that the 0/1 reward hides, e.g. the fraction of fields right). A Verdict that breaks these
    rules raises ValueError where it is made, so the mistake shows in the verifier that made it (the
    run counts it as a verifier failure)."""

    reward: float
    feedback: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = verdict_problem(self)
        if problem:
            raise ValueError(problem)
        self.reward = float(self.reward)


# The kinds of ``info["verifier_failure"]`` that mean the sample has no verdict at all (its verify()
# raised, hung, died, or returned something that is not a valid Verdict): it scores 0 and gets no
# teacher signal. ("group_hook": review_group failed, the per-sample verdicts stand.)
NO_VERDICT = frozenset({"error", "timeout", "crash", "invalid"})


def has_no_verdict(verdict: Verdict) -> bool:
    return verdict.info.get("verifier_failure") in NO_VERDICT


def verdict_problem(verdict: Any) -> str | None:
    """Why ``verdict`` is not a valid Verdict, or None."""
    if not isinstance(verdict, Verdict):
        return f"verify() returned {type(verdict).__name__} ({verdict!r:.80}), expected a Verdict(reward, feedback, info)"
    reward, low, high = verdict.reward, *REWARD_RANGE
    if not isinstance(reward, numbers.Real):
        return f"Verdict.reward must be a number in [{low:g}, {high:g}], got {type(reward).__name__} ({reward!r:.80})"
    if not (math.isfinite(reward) and low <= reward <= high):
        return f"Verdict.reward must be a finite number in [{low:g}, {high:g}], got {reward!r}"
    if verdict.feedback is not None and not isinstance(verdict.feedback, str):
        return f"Verdict.feedback must be a string or None, got {type(verdict.feedback).__name__} ({verdict.feedback!r:.80})"
    if not isinstance(verdict.info, dict):
        return f"Verdict.info must be a dict, got {type(verdict.info).__name__}"
    metrics = verdict.info.get("metrics", {})
    if not isinstance(metrics, dict):
        return f"Verdict.info['metrics'] must be a dict of name -> number, got {type(metrics).__name__}"
    for name, value in metrics.items():
        if not isinstance(name, str) or not isinstance(value, numbers.Real) or isinstance(value, bool) \
                or not math.isfinite(value):
            return f"Verdict.info['metrics'] must map names to finite numbers, got {name!r}: {value!r:.80}"
    return None


class Environment:
    """Subclass and override ``tasks`` and ``verify`` (``verify`` may be ``async def``).

    ``max_concurrency`` is how many ``verify`` calls one verifier worker runs at once (threads, or
    tasks of one event loop for ``async def verify``); raise it when verification waits on
    subprocesses or the network rather than on this process's CPU."""

    max_concurrency: int = 1

    def tasks(self, split: str) -> Sequence[Task]:
        raise NotImplementedError(f"{type(self).__name__} must implement tasks(split)")

    def verify(self, task: Task, completion: str) -> Verdict:
        raise NotImplementedError(f"{type(self).__name__} must implement verify(task, completion)")

    def review_group(self, task: Task, completions: list[str], verdicts: list[Verdict]) -> list[Verdict]:
        """Optional group-level hook: sees one prompt's whole group once every sample is verified and
        returns the verdicts the teacher contexts are built from (same length, same order). Use it
        for feedback that compares siblings ("3 of 8 attempts printed the same wrong value"), or to
        re-score relative to the group. The default keeps the verdicts as they are."""
        return verdicts


def load_environment(import_path: str, kwargs: dict[str, Any] | None = None) -> Environment:
    """Builds ``module.path:ClassName(**kwargs)`` or ``path/to/file.py:ClassName(**kwargs)`` (a file
    anywhere, e.g. outside any package); every failure says what to fix in the recipe."""
    module_name, sep, class_name = import_path.rpartition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(
            f"environment.name={import_path!r}: expected 'module.path:ClassName', "
            "e.g. 'environments.arithmetic:Arithmetic', or 'path/to/file.py:ClassName'"
        )
    try:
        module = _import_file(module_name, import_path) if module_name.endswith(".py") else importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"environment.name={import_path!r}: cannot import {module_name!r}: {err}") from err
    except SystemExit as err:  # a script's `sys.exit()` at module level: it would end the run silently
        raise ValueError(f"environment.name={import_path!r}: importing {module_name!r} called sys.exit({err.code!r}); "
                         "an environment module must not exit when imported (put script code under "
                         "`if __name__ == '__main__':`)") from None
    except Exception as err:  # a bug at module level: name the module, not just the exception
        raise ValueError(f"environment.name={import_path!r}: importing {module_name!r} raised "
                         f"{type(err).__name__}: {err}") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"environment.name={import_path!r}: module {module_name!r} has no {class_name!r}")
    for method in ("tasks", "verify"):
        if not callable(getattr(cls, method, None)):
            raise ValueError(f"environment.name={import_path!r}: {class_name} has no method {method}()")
    try:
        inspect.signature(cls).bind(**(kwargs or {}))
    except TypeError as err:
        raise ValueError(f"environment.kwargs for {import_path!r} do not fit {class_name}: {err}") from err
    return cls(**(kwargs or {}))


def _import_file(path: str, import_path: str) -> ModuleType:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ValueError(f"environment.name={import_path!r}: file {str(file)!r} does not exist")
    # A stable module name per file, so that the same file imported twice is one module, and its
    # directory on sys.path, so that it can import its neighbours.
    name = f"sdpo_user_env_{abs(hash(str(file))):x}"
    if name in sys.modules:
        return sys.modules[name]
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
