"""Tool use, ToolAlpaca style (SPEC section 7): the completion calls tools as

    Action: getWeather
    Action Input: {"city": "Zurich"}

Reward 1 iff the multiset of action names equals the ground truth's and the merged inputs (all
Action Input objects merged in order) equal the ground truth's merged inputs. Feedback names the
mismatch: missing or unexpected actions, wrong or missing arguments, unparsable input. Calls written
while thinking are never judged, and a completion without a call never earns reward.

Rows: this package's form (``instruction``, ``tools``, ``golden_actions`` [{name, input}]), rows
prepared by ``python -m sdpo.data prepare tooluse`` (``messages`` holding the authors' ReAct prompt,
``golden_actions``), or the authors' own rows (lasgroup/SDPO ``datasets/tooluse/{train,test}.json``:
``prompt`` and ``answer``, a JSON string of ``[{"Action": ..., "Action_Input": "<JSON object>"}]``),
which ``from_authors_row`` converts.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from environments.answers import strip_thinking
from environments.base import Environment, Task, Verdict
from environments.loaders import load_rows, require

_ACTION = re.compile(r"^\s*Action\s*:\s*(.+?)\s*$", flags=re.MULTILINE)
_STOP = re.compile(r"^\s*(Action\s*:|Observation\s*:|Final Answer\s*:|Thought\s*:)", flags=re.MULTILINE)
INSTRUCTIONS = ("Use the tools to fulfil the request. For each call write two lines:\nAction: <tool name>\n"
                "Action Input: <JSON object of arguments>")


def parse_actions(text: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """[(action name, parsed input or None)], [parse problems]."""
    actions, problems = [], []
    for match in _ACTION.finditer(text):
        name = match.group(1)
        rest = text[match.end():]
        tag = re.match(r"\s*Action Input\s*:\s*", rest)
        if not tag:
            actions.append((name, None))
            problems.append(f"Action {name!r} has no 'Action Input:' line.")
            continue
        body = rest[tag.end():]
        stop = _STOP.search(body)
        raw = (body[: stop.start()] if stop else body).strip()
        try:
            value = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            value, problems = None, problems + [f"Action Input of {name!r} is not valid JSON: {raw[:120]!r}."]
        actions.append((name, value))
    return actions, problems


def merged_inputs(actions: list[tuple[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for _, value in actions:
        if isinstance(value, dict):
            merged.update(value)
    return merged


def _golden(row: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    golden = require(row, "golden_actions", where) if "golden_actions" in row else require(row, "actions", where)
    out = []
    for action in golden:
        name = action.get("name", action.get("action"))
        value = action.get("input", action.get("action_input", action.get("arguments", {})))
        if isinstance(value, str) and value.strip():
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: the input of golden action {name!r} is not JSON: {err}") from None
        if not name:
            raise ValueError(f"{where}: a golden action has no name: {action!r}")
        out.append((name, value or {}))
    if not out:
        raise ValueError(f"{where}: no golden actions (a task every completion would fail, or an empty one would pass)")
    return out


def from_authors_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """The authors' ToolUse row -> this module's prepared form: the ReAct prompt as the user message
    (they send it with no system prompt) and ``answer``'s actions as ``golden_actions``."""
    raw = require(row, "answer", where)
    try:
        actions = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: 'answer' is not a JSON list of actions: {err}") from None
    if not isinstance(actions, list) or not all(isinstance(a, dict) and "Action" in a for a in actions):
        raise ValueError(f"{where}: 'answer' must be a list of {{\"Action\", \"Action_Input\"}} objects, got {raw!r:.200}")
    messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else [])
    messages.append({"role": "user", "content": require(row, "prompt", where)})
    golden = [{"name": a["Action"], "input": a.get("Action_Input") or {}} for a in actions]
    out = {"id": str(row.get("idx", row.get("id", ""))) or None, "messages": messages, "golden_actions": golden}
    _golden(out, where)  # refuse a bad row now, not when the first completion is scored
    return {k: v for k, v in out.items() if v is not None}


class ToolUse(Environment):
    """``dataset``: ``"sample"``, a local file or a hub name. Rows: ``instruction``, ``tools`` (text or a
    list of specs shown to the model), ``golden_actions`` [{name, input}]."""

    def __init__(self, dataset: str = "sample", config: str | None = None, limit_per_split: int | None = None,
                 feedback: bool = True, splits: dict[str, str] | None = None):
        self.dataset, self.config, self.limit, self.feedback, self.splits = dataset, config, limit_per_split, feedback, splits or {}

    def tasks(self, split: str) -> list[Task]:
        rows = load_rows(self.dataset, self.splits.get(split, split), config=self.config, sample="tooluse_sample.jsonl",
                         limit=self.limit)
        tasks = []
        for i, row in enumerate(rows):
            where = f"tooluse dataset row {i}"
            if "messages" not in row and "prompt" in row and "answer" in row:
                row = from_authors_row(row, where)
            if "messages" in row:
                messages = [dict(m) for m in row["messages"]]
            else:
                tools = require(row, "tools", where)
                tools_text = tools if isinstance(tools, str) else json.dumps(tools, indent=1)
                content = f"Tools:\n{tools_text}\n\nRequest: {require(row, 'instruction', where)}\n\n{INSTRUCTIONS}"
                messages = [{"role": "user", "content": content}]
            golden = _golden(row, where)
            tasks.append(Task(id=str(row.get("id", f"{split}-{i}")), messages=messages,
                              data={"actions": [[n, v] for n, v in golden]}, demonstration=row.get("demonstration")))
        return tasks

    def verify(self, task: Task, completion: str) -> Verdict:
        golden = [(n, v) for n, v in task.data["actions"]]
        actions, problems = parse_actions(strip_thinking(completion))
        want_names, got_names = Counter(n for n, _ in golden), Counter(n for n, _ in actions)
        want_inputs, got_inputs = merged_inputs(golden), merged_inputs(actions)
        if actions and not problems and got_names == want_names and got_inputs == want_inputs:
            return Verdict(reward=1.0)
        if not actions:
            problems.append("No 'Action:' line found.")
        missing, extra = want_names - got_names, got_names - want_names
        if missing:
            problems.append("Missing actions: " + ", ".join(sorted(missing.elements())) + ".")
        if extra:
            problems.append("Unexpected actions: " + ", ".join(sorted(extra.elements())) + ".")
        if not missing and not extra:
            for key in sorted(set(want_inputs) | set(got_inputs)):
                if key not in got_inputs:
                    problems.append(f"Missing argument {key!r}.")
                elif key not in want_inputs:
                    problems.append(f"Unexpected argument {key!r}.")
                elif got_inputs[key] != want_inputs[key]:
                    problems.append(f"Wrong value for {key!r}: got {json.dumps(got_inputs[key])[:80]}.")
        return Verdict(reward=0.0, feedback=" ".join(problems) if self.feedback else None)
