"""Teacher contexts: the prompt the teacher sees for each sample (SPEC section 2).

Pure Python on purpose (no torch, no tokenizer): the chat template and tokenization happen in the
caller, so these rules can be tested and reasoned about as plain strings.

For every sample of a group (all samples of one prompt, in batch order) the teacher gets the same
chat as the student, except that the last user message is rewritten into the reprompt template with
a demonstration (a successful sibling, or an offline demonstration) and/or the sample's own
environment feedback. A sample that gets neither keeps the original chat and ``sd_mask = 0``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotation; keeps this module free of runtime dependencies
    from sdpo.config import TeacherContextConfig

# Non-greedy and DOTALL so each block ends at its own </think> even when it spans lines; the
# trailing \s* drops the blank lines a model usually writes between its thinking and its answer.
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


@dataclass
class TeacherContext:
    messages: list[dict[str, str]]  # the teacher's chat messages
    sd_mask: int  # 1 if a solution or feedback was added, else 0
    has_solution: bool
    has_feedback: bool


def remove_thinking(text: str) -> str:
    """Remove every ``<think>...</think>`` block and the whitespace right after it."""
    return _THINK_BLOCK.sub("", text)


def _last_user_index(messages: list[dict[str, str]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise ValueError("teacher context: the prompt's messages contain no user message to reprompt")


def _demonstration_index(i: int, successes: list[bool], exclude_self: bool) -> int | None:
    # First success of the group in batch order; the sample itself is skipped when excluded, so the
    # first success falls through to the second one and a lone success gets nothing.
    for j, ok in enumerate(successes):
        if ok and not (exclude_self and j == i):
            return j
    return None


def build_teacher_contexts(
    messages: list[dict[str, str]],
    completions: list[str],
    rewards: list[float],
    feedbacks: list[str | None],
    cfg: TeacherContextConfig,
    demonstration: str | None = None,
    turns: list[list[dict]] | None = None,
) -> list[TeacherContext]:
    """Build the teacher context of every sample of one group (SPEC section 2).

    ``messages`` is the group's prompt chat; ``completions`` the decoded responses (no special
    tokens), ``rewards`` and ``feedbacks`` their verification results, all in batch order.

    ``demonstration`` is the task's offline demonstration (SDFT), used per
    ``cfg.demonstration_source``: "rollouts" ignores it (SDPO); "dataset" uses only it, never a
    sibling (SDFT); "both" uses it as the fallback for samples that got no sibling demonstration,
    because a successful on-policy sibling is closer to what the student can produce (so with
    ``dont_reprompt_on_self_success`` a lone success is taught from it instead of getting nothing).
    It goes through the same thinking removal as sibling demonstrations.

    ``turns`` (multi-turn episodes with ``episode_demonstration: turns``, SPEC 2a): each sample's
    episode as chat messages. A sibling's demonstration is then not text in the reprompt but the
    conversation's next turns: the task's chat, the sibling's turns, then the last user message
    again through the reprompt template with no solution section (and the feedback, if any).
    """
    n = len(completions)
    if len(rewards) != n or len(feedbacks) != n:
        raise ValueError(
            f"teacher context: got {n} completions, {len(rewards)} rewards and "
            f"{len(feedbacks)} feedbacks; they must be one per sample"
        )
    last_user = _last_user_index(messages)
    prompt = messages[last_user]["content"]
    successes = [r >= cfg.success_threshold for r in rewards]

    contexts = []
    source = cfg.demonstration_source
    offline = demonstration if source in ("dataset", "both") else None
    for i in range(n):
        j = _demonstration_index(i, successes, cfg.dont_reprompt_on_self_success) if source != "dataset" else None
        demo = completions[j] if j is not None else offline
        demo_turns = None if turns is None or j is None else [  # copies: contexts never share a message
            {**m, "content": remove_thinking(m["content"])} if cfg.remove_thinking_from_demonstration
            and m.get("role") == "assistant" else dict(m) for m in turns[j]]
        if demo is not None and cfg.remove_thinking_from_demonstration:
            demo = remove_thinking(demo)
        has_solution = demo is not None

        fb = feedbacks[i]  # the sample's own feedback only, never a sibling's
        has_feedback = (
            cfg.include_environment_feedback
            and fb is not None
            and fb.strip() != ""
            and not (cfg.environment_feedback_only_without_solution and has_solution)
        )

        # Copies, so that callers editing one context cannot change another or the original.
        teacher_messages = [dict(m) for m in messages]
        if has_solution or has_feedback:
            solution = cfg.solution_template.format(successful_previous_attempt=demo) if has_solution else ""
            feedback = cfg.feedback_template.format(feedback_raw=fb) if has_feedback else ""
            if demo_turns is None:
                teacher_messages[last_user]["content"] = cfg.reprompt_template.format(
                    prompt=prompt, solution=solution, feedback=feedback
                )
            else:  # the demonstration as the conversation's next turns, then the question again
                again = {**messages[last_user], "content": cfg.reprompt_template.format(prompt=prompt, solution="", feedback=feedback)}
                teacher_messages[last_user + 1:last_user + 1] = [*demo_turns, again]
        contexts.append(
            TeacherContext(
                messages=teacher_messages,
                sd_mask=int(has_solution or has_feedback),
                has_solution=has_solution,
                has_feedback=has_feedback,
            )
        )
    return contexts


def truncate_prompt_ids(ids: list[int], max_tokens: int, policy: str) -> list[int]:
    """Fit a tokenized teacher prompt into ``max_tokens`` per ``teacher_truncation``.

    "left" keeps the last ``max_tokens`` ids (so the assistant header the response follows is kept),
    "right" keeps the first ones (the reference behaviour), "error" refuses.
    """
    if max_tokens <= 0:
        raise ValueError(f"teacher_context.max_teacher_prompt_tokens must be positive, got {max_tokens}")
    if policy not in ("left", "right", "error"):
        raise ValueError(f"teacher_context.teacher_truncation must be left, right or error, got {policy!r}")
    if len(ids) <= max_tokens:
        return list(ids)
    if policy == "left":
        return list(ids[-max_tokens:])
    if policy == "right":
        return list(ids[:max_tokens])
    raise ValueError(
        f"teacher prompt has {len(ids)} tokens, more than teacher_context.max_teacher_prompt_tokens="
        f"{max_tokens} (teacher_truncation=error)"
    )
