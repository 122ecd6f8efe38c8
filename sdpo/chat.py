"""Chat templates applied once, by us: the engine and the learner see exactly these ids.

A run's chat-template arguments (``model.chat_template_kwargs``, e.g. ``enable_thinking: false``) are
bound to its tokenizer once (``bind_template_kwargs``), so every prompt templated with that
tokenizer -- the student's, the teacher's reprompt, eval and probe prompts -- gets the same ones:
a teacher that saw a different template than the student would score a different prompt format.
"""

from __future__ import annotations

from typing import Any

_ATTRIBUTE = "sdpo_chat_template_kwargs"
# Arguments chat_ids sets itself: a recipe must not change what the engine and the learner are given.
_RESERVED = {"tokenize", "return_dict", "add_generation_prompt", "conversation", "messages"}


def bind_template_kwargs(tokenizer: Any, template_kwargs: dict[str, Any] | None) -> Any:
    """Returns ``tokenizer`` with ``template_kwargs`` attached as the defaults of every ``chat_ids``
    call on it."""
    template_kwargs = dict(template_kwargs or {})
    reserved = _RESERVED & set(template_kwargs)
    if reserved:
        raise ValueError(f"model.chat_template_kwargs may not set {sorted(reserved)}: the framework sets them")
    setattr(tokenizer, _ATTRIBUTE, template_kwargs)
    return tokenizer


def bound_template_kwargs(tokenizer: Any) -> dict[str, Any]:
    return dict(getattr(tokenizer, _ATTRIBUTE, None) or {})


def chat_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, as a plain ``list[int]``; the
    tokenizer's bound template arguments apply, ``template_kwargs`` override them.

    transformers 5 made ``return_dict=True`` the default of ``apply_chat_template`` (a BatchEncoding
    comes back), while 4.x returned a list; ``return_dict=False`` gives the list on both, and the
    checks below cover a dict or a batched (nested) answer from other tokenizer classes.
    """
    kwargs = {**bound_template_kwargs(tokenizer), **template_kwargs}
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, **kwargs
    )
    if hasattr(out, "keys"):  # BatchEncoding / dict
        out = out["input_ids"]
    if hasattr(out, "tolist"):  # tensor / array
        out = out.tolist()
    if len(out) > 0 and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(i) for i in out]
