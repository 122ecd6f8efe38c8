"""Multi-turn environments: the model acts over several turns, calling tools, before it answers.

Plain Python like the rest of the contract (no torch, no Ray). The framework (sdpo/episodes.py)
drives an episode: ``start(task)`` once, then after every model turn ``step(state, message)``,
which returns either the observation to show the model (tool messages) or the episode's final
``Verdict``. The tools an environment declares are JSON schemas in the format transformers'
``apply_chat_template(..., tools=...)`` takes, so the model sees them through its own chat template.

The default ``step`` covers the common case: a turn with tool calls gets each call's result from
``call_tool``; a turn without one is the final answer, scored by ``verify(task, content)`` like a
single-turn completion. Override ``step`` for anything else (a judge's feedback per turn, a
simulated user). A tool that raises, or a ``step`` that runs past ``environment.tool_timeout_s``,
ends the episode with reward 0 and feedback saying what failed; limits on turns and tokens are the
framework's (``environment.max_turns_per_episode``, ``environment.max_tokens_per_episode``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from environments.base import Environment, Task, Verdict

# JSON-schema type names a tool parameter may have (what chat templates render).
_PARAM_TYPES = {"string", "integer", "number", "boolean", "array", "object"}


@dataclasses.dataclass
class EpisodeState:
    """What one episode carries between turns: its task, the number of model turns so far (the
    framework keeps it), and ``data`` for the environment's own use (a scratch file system, a
    conversation with a simulated user, ...)."""

    task: Task
    turn: int = 0
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


def function_tool(name: str, description: str, **parameters: str) -> dict[str, Any]:
    """A tool schema in the OpenAI / transformers "function" format, every parameter required:
    ``function_tool("add", "Add two integers", a="integer", b="integer")``."""
    bad = {k: v for k, v in parameters.items() if v not in _PARAM_TYPES}
    if bad:
        raise ValueError(f"tool {name!r}: parameter types must be among {sorted(_PARAM_TYPES)}, got {bad}")
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in parameters.items()},
                       "required": list(parameters)}}}


def tool_names(tools: list[dict[str, Any]]) -> list[str]:
    return [t.get("function", t).get("name") for t in tools]


class MultiTurnEnvironment(Environment):
    """Subclass; set ``tools`` and override ``tasks``, ``verify`` (the final answer) and
    ``call_tool``, or ``start``/``step`` themselves."""

    tools: list[dict[str, Any]] = []

    def start(self, task: Task) -> EpisodeState:
        return EpisodeState(task)

    def step(self, state: EpisodeState, message: dict[str, Any]) -> list[dict[str, Any]] | Verdict:
        """``message``: the model's turn as a chat message, ``{"role": "assistant", "content": str,
        "tool_calls": [{"name": str, "arguments": dict}, ...]}`` (no "tool_calls" key when it made
        none). Returns the tool messages to append (``{"role": "tool", "name", "content"}``), or the
        final Verdict."""
        calls = message.get("tool_calls") or []
        if not calls:
            return self.verify(state.task, message["content"])
        known = tool_names(self.tools)
        observations = []
        for call in calls:
            if call["name"] not in known:
                result = f"unknown tool {call['name']!r}; the tools are {known}"
            else:
                result = str(self.call_tool(state, call["name"], call["arguments"]))
            observations.append({"role": "tool", "name": call["name"], "content": result})
        return observations

    def call_tool(self, state: EpisodeState, name: str, arguments: dict[str, Any]) -> str:
        raise NotImplementedError(f"{type(self).__name__} declares tools but does not implement call_tool()")


def is_multi_turn(env: Any) -> bool:
    return isinstance(env, MultiTurnEnvironment) or (callable(getattr(env, "start", None))
                                                      and callable(getattr(env, "step", None)))
