"""From verified rollouts to learner samples: tokenized prompts, teacher prompts and masks.

Runs in the driver. Pure bookkeeping on token ids and text; the learner receives only ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from environments import Task, Verdict
from sdpo.chat import chat_ids
from sdpo.config import TeacherContextConfig
from sdpo.loss import group_advantages
from sdpo.rollout.base import Completion
from sdpo.teacher_context import build_teacher_contexts, truncate_prompt_ids


@dataclasses.dataclass
class TrainSample:
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    teacher_prompt_ids: list[int]
    sd_mask: int
    advantage: float = 0.0  # group-relative reward (GRPO / hybrid objectives)

    @property
    def num_tokens(self) -> int:
        # What a learner forward costs: the student and the teacher sequence.
        return len(self.prompt_ids) + len(self.teacher_prompt_ids) + 2 * len(self.response_ids)


def build_batch(
    tasks: list[Task],
    prompt_ids: list[list[int]],
    groups: list[list[Completion]],
    verdicts: list[list[Verdict]],
    tokenizer: Any,
    cfg: TeacherContextConfig,
    std_normalize_advantages: bool = True,
) -> tuple[list[TrainSample], dict[str, float]]:
    samples: list[TrainSample] = []
    with_solution = with_feedback = 0
    rendered: dict[str, list[int]] = {}  # chat template output per distinct teacher context
    for task, ids, group, group_verdicts in zip(tasks, prompt_ids, groups, verdicts):
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group]
        contexts = build_teacher_contexts(
            task.messages, texts, [v.reward for v in group_verdicts], [v.feedback for v in group_verdicts], cfg,
            demonstration=task.demonstration,
        )
        rewards = torch.tensor([v.reward for v in group_verdicts])
        advantages = group_advantages(rewards, torch.zeros(len(rewards)), normalize_std=std_normalize_advantages).tolist()
        for completion, context, advantage in zip(group, contexts, advantages):
            key = repr(context.messages)  # siblings shown the same demonstration share one teacher prompt
            if context.sd_mask and key not in rendered:
                rendered[key] = truncate_prompt_ids(chat_ids(tokenizer, context.messages), cfg.max_teacher_prompt_tokens,
                                                    cfg.teacher_truncation)
            teacher_ids = rendered[key] if context.sd_mask else ids
            samples.append(TrainSample(ids, completion.token_ids, completion.logprobs, teacher_ids, context.sd_mask, advantage))
            with_solution += context.has_solution
            with_feedback += context.has_feedback
    n = max(1, len(samples))
    stats = {
        "teacher/with_solution_frac": with_solution / n,
        "teacher/with_feedback_frac": with_feedback / n,
        "teacher/signal_frac": sum(s.sd_mask for s in samples) / n,
        "teacher/prompt_tokens_mean": sum(len(s.teacher_prompt_ids) for s in samples) / n,
    }
    return samples, stats

