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

from typing import TYPE_CHECKING

from environments import Task

if TYPE_CHECKING:
    from sdpo.trainer import Run


def probe_teacher(run: Run, tasks: list[Task], step: int) -> dict[str, float]:
    """``run``: the trainer's parts (``sample_and_verify``, ``teacher_contexts``, ``serve_weights``)."""
    cfg = run.cfg
    n = cfg.eval.teacher_probe_samples
    seed = 20_000_003 + cfg.seed  # the same probe at every step, so the curve shows the teacher, not the dice
    students = run.sample_and_verify(tasks, n, cfg.rollout.temperature, seed)
    # The task's own demonstration counts too: it is the "correct demonstration" the probe shows
    # when no sibling succeeded.
    context_cfg = cfg.teacher_context
    if context_cfg.demonstration_source == "rollouts" and any(t.demonstration for t in tasks):
        context_cfg = context_cfg.model_copy(update={"demonstration_source": "both"})
    samples, _ = run.teacher_contexts(students, context_cfg)
    taught = [(s, tasks[i // n]) for i, s in enumerate(samples) if s.sd_mask]
    student_success = students.success_frac(context_cfg.success_threshold)
    if not taught:
        return {"probe/student_success": student_success, "probe/contexts": 0.0}

    if cfg.has_separate_teacher:  # the engine answers with the teacher's weights, then gets the student's back
        run.serve_weights(step, teacher=True)
    teachers = run.sample_and_verify([task for _, task in taught], 1, cfg.eval.temperature, seed + 1,
                                     prompt_ids=[s.teacher_prompt_ids for s, _ in taught])
    if cfg.has_separate_teacher:
        run.serve_weights(step)
    return {"probe/teacher_success": teachers.success_frac(context_cfg.success_threshold),
            "probe/student_success": student_success, "probe/contexts": float(len(taught))}
