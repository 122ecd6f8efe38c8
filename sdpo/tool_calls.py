"""Tool calls in a model's text, read the way its own chat template writes them.

We never hand-write a call format: ``ToolCallFormat.from_tokenizer`` renders an assistant message
with two probe tool calls through the tokenizer's chat template (transformers'
``apply_chat_template`` takes ``tool_calls`` on assistant messages and a ``tool`` role), and reads
off the markers around each call and the JSON keys of its name and arguments. Templates that write
calls as JSON between fixed markers (Qwen2.5, Qwen3, Hermes: ``<tool_call>\\n{...}\\n</tool_call>``,
and the tiny tokenizer's) are supported; any other is refused with an error at start-up.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sdpo.chat import bound_template_kwargs

_CONTENT, _NAMES, _ARG = "Pr0beContent", ("pr0be_tool_a", "pr0be_tool_b"), "pr0be_arg"


@dataclasses.dataclass(frozen=True)
class ToolCallFormat:
    opening: str  # e.g. "<tool_call>"
    closing: str  # e.g. "</tool_call>"
    name_key: str  # the JSON key holding the tool's name ("name")
    arguments_key: str  # the JSON key holding its arguments ("arguments")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ToolCallFormat":
        calls = [{"type": "function", "function": {"name": name, "arguments": {_ARG: i}}} for i, name in enumerate(_NAMES)]
        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _CONTENT, "tool_calls": calls}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                             **bound_template_kwargs(tokenizer))
        start = text.find(_CONTENT)
        objects = _json_objects(text, start + len(_CONTENT)) if start >= 0 else []
        found = [(a, b, obj) for a, b, obj in objects if any(v in _NAMES for v in obj.values())]
        if len(found) < 2:
            raise ValueError("the tokenizer's chat template does not render an assistant message's tool_calls as JSON "
                             "objects: multi-turn tool environments need a template that does (e.g. Qwen2.5/Qwen3)")
        (a1, b1, first), (a2, _, _) = found[:2]
        opening = text[start + len(_CONTENT):a1].strip()
        between = text[b1:a2].strip()
        if not opening or not between.endswith(opening) or not between[: -len(opening)].strip():
            raise ValueError(f"the chat template writes tool calls without markers around them ({text[start:]!r}): "
                             "only marker-delimited JSON calls (<tool_call>...</tool_call>) are supported")
        name_key = next(k for k, v in first.items() if v == _NAMES[0])
        arguments_key = next(k for k, v in first.items() if v == {_ARG: 0})
        return cls(opening, between[: -len(opening)].strip(), name_key, arguments_key)

    def parse(self, text: str) -> dict[str, Any]:
        """The assistant message ``text`` stands for: ``{"role": "assistant", "content": ...,
        "tool_calls": [{"name", "arguments"}]}`` (no "tool_calls" key when it has none). A call
        that is not valid JSON, or lacks a name, becomes ``{"name": None, "error": why}``."""
        head, sep, rest = text.partition(self.opening)
        message: dict[str, Any] = {"role": "assistant", "content": head.strip() if sep else text}
        calls = []
        while sep:
            body, closed, after = rest.partition(self.closing)
            calls.append(self._call(body, closed))
            if not closed:
                break
            _, sep, rest = after.partition(self.opening)
        if calls:
            message["tool_calls"] = calls
        return message

    def _call(self, body: str, closed: str) -> dict[str, Any]:
        if not closed:
            return {"name": None, "error": f"the tool call has no closing {self.closing}"}
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as err:
            return {"name": None, "error": f"the tool call is not valid JSON ({err})"}
        if not isinstance(obj, dict) or not isinstance(obj.get(self.name_key), str):
            return {"name": None, "error": f"the tool call needs a string {self.name_key!r}"}
        arguments = obj.get(self.arguments_key, {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            return {"name": obj[self.name_key], "error": f"the tool call's {self.arguments_key!r} must be an object"}
        return {"name": obj[self.name_key], "arguments": arguments}


def _json_objects(text: str, start: int) -> list[tuple[int, int, dict]]:
    """(begin, end, object) of each top-level JSON object in ``text`` from ``start`` on."""
    decoder, found, i = json.JSONDecoder(), [], start
    while (i := text.find("{", i)) >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(obj, dict):
            found.append((i, end, obj))
        i = end
    return found
