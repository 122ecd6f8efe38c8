"""Teacher competence: can the teacher still use the contexts it is given?

SDPO trusts that the model, shown a successful sibling or its own feedback, answers better than it
does alone. That can stop being true while training (an EMA teacher drifts along with a student
that never practises reading a shown solution), and the loss does not show it. This probe measures
it directly on a fixed set of held-out tasks: the student answers, the verifier scores, teacher
contexts are built exactly as in training (siblings, feedback, and the task's own demonstration
when it has one), and the *teacher's weights* answer from those contexts. A falling
`probe/teacher_success` is the early warning of teacher drift.

Whose weights answer: the EMA, frozen or checkpoint teacher; the current policy when the teacher is
the live policy (or GRPO, which has none); for trust_region, the initial model it is anchored to.
"""

from __future__ import annotations

from environments import Task
from sdpo.batch import build_batch
from sdpo.chat import chat_ids
from sdpo.config import Config
from sdpo.rollout.base import Sampling


def probe_teacher(cfg: Config, tasks: list[Task], rollout, envs, learners, tokenizer, stops: list[int],
                  weights_dir: str, step: int) -> dict[str, float]:
    n = cfg.eval.teacher_probe_samples
    sampling = dict(top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_response_tokens, stop_token_ids=stops)
    seed = 20_000_003 + cfg.seed  # the same probe at every step, so the curve shows the teacher, not the dice

    prompt_ids = [chat_ids(tokenizer, t.messages) for t in tasks]
    groups = rollout.generate(prompt_ids, Sampling(n=n, temperature=cfg.rollout.temperature, seed=seed, **sampling))
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for g in groups for c in g]
    flat = envs.verify([t for t in tasks for _ in range(n)], texts, group_size=n)
    verdicts = [flat[i * n : (i + 1) * n] for i in range(len(tasks))]
    # The task's own demonstration counts too: it is the "correct demonstration" the probe shows
    # when no sibling succeeded.
    context_cfg = cfg.teacher_context
    if context_cfg.demonstration_source == "rollouts" and any(t.demonstration for t in tasks):
        context_cfg = context_cfg.model_copy(update={"demonstration_source": "both"})
    samples, _ = build_batch(tasks, prompt_ids, groups, verdicts, tokenizer, context_cfg)
    taught = [(s, tasks[i // n]) for i, s in enumerate(samples) if s.sd_mask]
    student_success = sum(v.reward >= context_cfg.success_threshold for v in flat) / len(flat)
    if not taught:
        return {"probe/student_success": student_success, "probe/contexts": 0.0}

    separate = learners.has_separate_teacher
    if separate:  # the engine answers with the teacher's weights, then gets the student's back
        rollout.load_weights(learners.export_weights(weights_dir + "-teacher", step, teacher=True), version=step)
    answers = rollout.generate([s.teacher_prompt_ids for s, _ in taught],
                               Sampling(n=1, temperature=cfg.eval.temperature, seed=seed + 1, **sampling))
    if separate:
        rollout.load_weights(learners.export_weights(weights_dir, step), version=step)
    answer_texts = [tokenizer.decode(g[0].token_ids, skip_special_tokens=True) for g in answers]
    teacher_verdicts = envs.verify([task for _, task in taught], answer_texts)
    teacher_success = sum(v.reward >= context_cfg.success_threshold for v in teacher_verdicts) / len(teacher_verdicts)
    return {"probe/teacher_success": teacher_success, "probe/student_success": student_success, "probe/contexts": float(len(taught))}
