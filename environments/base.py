"""The environment contract. Plain Python: no torch, no Ray, so a verifier can be read and tested alone.

An environment is a class named in the recipe by import path (``my_pkg.my_env:MyEnv``) and built
with the recipe's keyword arguments. It hands out tasks and verifies completions; the framework
does everything else (sampling, teacher contexts, learning).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
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


@dataclasses.dataclass
class Verdict:
    reward: float
    feedback: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Environment:
    """Subclass and override ``tasks`` and ``verify`` (``verify`` may be ``async def``)."""

    def tasks(self, split: str) -> Sequence[Task]:
        raise NotImplementedError(f"{type(self).__name__} must implement tasks(split)")

    def verify(self, task: Task, completion: str) -> Verdict:
        raise NotImplementedError(f"{type(self).__name__} must implement verify(task, completion)")


def load_environment(import_path: str, kwargs: dict[str, Any] | None = None) -> Environment:
    """Builds ``module.path:ClassName(**kwargs)``; every failure says what to fix in the recipe."""
    module_name, sep, class_name = import_path.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(
            f"environment.name={import_path!r}: expected 'module.path:ClassName', "
            "e.g. 'environments.arithmetic:Arithmetic'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"environment.name={import_path!r}: cannot import {module_name!r}: {err}") from err
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
