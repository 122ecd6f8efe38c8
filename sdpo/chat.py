"""Chat templates applied once, by us: the engine and the learner see exactly these ids."""

from __future__ import annotations

from typing import Any


def chat_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, as a plain ``list[int]``.

    transformers 5 made ``return_dict=True`` the default of ``apply_chat_template`` (a BatchEncoding
    comes back), while 4.x returned a list; ``return_dict=False`` gives the list on both, and the
    checks below cover a dict or a batched (nested) answer from other tokenizer classes.
    """
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, **template_kwargs
    )
    if hasattr(out, "keys"):  # BatchEncoding / dict
        out = out["input_ids"]
    if hasattr(out, "tolist"):  # tensor / array
        out = out.tolist()
    if len(out) > 0 and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(i) for i in out]
