"""From verified rollouts to learner samples: tokenized prompts, teacher prompts and masks.

Runs in the driver. Pure bookkeeping on token ids and text; the learner receives only ids.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch

from environments import Task, Verdict
from environments.base import has_no_verdict
from sdpo.chat import chat_ids
from sdpo.config import TeacherContextConfig
from sdpo.episodes import Episode, demonstration_text, demonstration_turns
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
    success: int = 0  # reward >= success_threshold (loss.objective=routed sends these to the policy gradient)
    # Multi-turn episodes (SPEC 2a): 1 on the model's tokens, 0 on observation tokens, which are
    # context only (no loss, no IS weight, not counted). None: every token is the model's.
    # rollout_logprobs has one entry per model token.
    loss_mask: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        # What a learner forward costs: the student and the teacher sequence.
        return len(self.prompt_ids) + len(self.teacher_prompt_ids) + 2 * len(self.response_ids)

    @property
    def loss_tokens(self) -> int:
        """Response tokens the loss is taken over: the model's."""
        return len(self.response_ids) if self.loss_mask is None else sum(self.loss_mask)


def build_batch(
    tasks: list[Task],
    prompt_ids: list[list[int]],
    groups: list[list[Completion]],
    verdicts: list[list[Verdict]],
    tokenizer: Any,
    cfg: TeacherContextConfig,
    std_normalize_advantages: bool = True,
    max_positions: int | None = None,
    tools: list[dict] | None = None,
) -> tuple[list[TrainSample], dict[str, float]]:
    """``max_positions``: the model's context (default: read from the tokenizer's model folder). No
    sequence the learner sees may be longer: a student prompt and response that do not fit are an
    error, and a teacher prompt is truncated (``teacher_truncation``) to fit next to its response.

    Multi-turn episodes (sdpo/episodes.py) are samples like any other: their demonstrations are
    ``demonstration_text`` per ``cfg.episode_demonstration``, ``tools`` go into the teacher's chat
    template as into the student's, and their loss masks travel with them (SPEC 2a)."""
    positions = max_positions or model_positions(getattr(tokenizer, "name_or_path", ""))
    samples: list[TrainSample] = []
    with_solution = with_feedback = no_verdict = 0
    rendered: dict[str, list[int]] = {}  # chat template output per distinct teacher context
    for task, ids, group, group_verdicts in zip(tasks, prompt_ids, groups, verdicts):
        texts = [demonstration_text(c, cfg.episode_demonstration) if isinstance(c, Episode)
                 else tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group]
        # A sample whose verifier failed was never judged: it is nobody's demonstration (-inf never
        # passes the success threshold), its error text is not feedback, and it teaches nothing.
        scored = [not has_no_verdict(v) for v in group_verdicts]
        turns = ([demonstration_turns(c) for c in group] if cfg.episode_demonstration == "turns"
                 and all(isinstance(c, Episode) for c in group) else None)
        contexts = build_teacher_contexts(
            task.messages, texts, [v.reward if ok else float("-inf") for v, ok in zip(group_verdicts, scored)],
            [v.feedback if ok else None for v, ok in zip(group_verdicts, scored)], cfg,
            demonstration=task.demonstration, turns=turns,
        )
        advantages = _advantages([v.reward for v in group_verdicts], scored, std_normalize_advantages)
        for completion, context, advantage, ok, verdict in zip(group, contexts, advantages, scored, group_verdicts):
            _check_fits(task, ids, completion.token_ids, positions)
            signal = bool(context.sd_mask and ok)
            key = repr(context.messages)  # siblings shown the same demonstration share one teacher prompt
            if signal and key not in rendered:
                rendered[key] = chat_ids(tokenizer, context.messages, **({"tools": tools} if tools else {}))
            teacher_ids = ids if not signal else truncate_prompt_ids(
                rendered[key], teacher_prompt_budget(cfg, positions, len(completion.token_ids)), cfg.teacher_truncation,
            )
            samples.append(TrainSample(ids, completion.token_ids, completion.logprobs, teacher_ids, int(signal), advantage,
                                       success=int(ok and verdict.reward >= cfg.success_threshold),
                                       loss_mask=list(completion.loss_mask) if isinstance(completion, Episode) else None))
            with_solution += context.has_solution and ok
            with_feedback += context.has_feedback and ok
            no_verdict += not ok
    n = max(1, len(samples))
    stats = {
        "teacher/with_solution_frac": with_solution / n,
        "teacher/with_feedback_frac": with_feedback / n,
        "teacher/signal_frac": sum(s.sd_mask for s in samples) / n,
        "teacher/prompt_tokens_mean": sum(len(s.teacher_prompt_ids) for s in samples) / n,
        "teacher/no_verdict_frac": no_verdict / n,
    }
    return samples, stats


def _advantages(rewards: list[float], scored: list[bool], normalize_std: bool) -> list[float]:
    """Group-relative advantages over the samples that were judged; an unjudged one gets 0 (no gradient)."""
    judged = [r for r, ok in zip(rewards, scored) if ok]
    if not judged:
        return [0.0] * len(rewards)
    values = iter(group_advantages(torch.tensor(judged), torch.zeros(len(judged)), normalize_std=normalize_std).tolist())
    return [next(values) if ok else 0.0 for ok in scored]


def teacher_prompt_budget(cfg: TeacherContextConfig, positions: int | None, response_tokens: int) -> int:
    """The most tokens a teacher prompt may keep: ``max_teacher_prompt_tokens`` (None: no limit of its
    own) and never more than the model's positions leave next to the response."""
    limits = [cfg.max_teacher_prompt_tokens] if cfg.max_teacher_prompt_tokens else []
    if positions:
        limits.append(positions - response_tokens)
    return max(1, min(limits)) if limits else 1 << 62


def _check_fits(task: Task, prompt: list[int], response: list[int], positions: int | None) -> None:
    if positions and len(prompt) + len(response) > positions:
        raise ValueError(f"task {task.id!r}: its prompt ({len(prompt)} tokens) and response ({len(response)} tokens) "
                         f"are longer than the model's {positions} positions: shorten the prompt or lower "
                         "rollout.max_response_tokens")


@functools.lru_cache(maxsize=8)
def model_positions(model_path: str) -> int | None:
    """``max_position_embeddings`` from the model's config.json (the text model's, for multimodal
    configs), or None when there is no local config to read."""
    config = Path(model_path) / "config.json" if model_path else None
    if config is None or not config.is_file():
        return None
    data = json.loads(config.read_text())
    data = data.get("text_config") or data
    value = data.get("max_position_embeddings") or data.get("n_positions") or data.get("max_sequence_length")
    return int(value) if value else None
