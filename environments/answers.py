"""Rules every built-in verifier applies before it looks for an answer.

1. Text a model wrote while thinking is never judged: a draft answer, code block or tool call inside
   ``<think>...</think>`` must not earn (or lose) reward. A model whose chat template opened the
   thinking block in the prompt (Qwen3 thinking models) emits only the closing ``</think>``, so
   everything before the last ``</think>`` is thinking too; an unclosed ``<think>`` (the response was
   cut off mid-thought) leaves nothing to judge.
2. An empty or missing extraction never earns reward: the caller checks ``answer_or_none``.
"""

from __future__ import annotations

import re

_THINK_BLOCK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)
_CLOSE = "</think>"
_OPEN = "<think>"


def strip_thinking(completion: str) -> str:
    """The part of ``completion`` a verifier may judge."""
    text = _THINK_BLOCK.sub("", completion)
    if _CLOSE in text:  # the opening tag was in the prompt
        text = text.rsplit(_CLOSE, 1)[1]
    if _OPEN in text:  # thinking never closed: nothing after it is an answer
        text = text.split(_OPEN, 1)[0]
    return text


def answer_or_none(text: str | None) -> str | None:
    """``text`` stripped, or None when nothing is left (an empty answer is no answer)."""
    if text is None:
        return None
    text = text.strip()
    return text or None
