"""Teacher guard: act when the teacher probe shows the teacher losing the ability to use its contexts.

Why: runs longer than the paper's report SDPO with a 5% EMA teacher collapsing (formatting artifacts
amplified, success falling to ~0 after hundreds of good steps) where a frozen teacher does not, and
on our small models the teacher probe (sdpo/probe.py) shows the EMA teacher's success from its own
contexts falling while the loss looks fine. The probe measures; this module decides what to do with
each reading; the learners act (``LearnerGroup.freeze_teacher`` / ``snapshot_teacher`` /
``reset_teacher``).

Rule (``teacher.guard``, ``teacher.guard_margin``): the guard tracks the best
``probe/teacher_success`` so far. A reading more than ``margin`` below it is a *drop*:
- ``warn``: say so (once per drop, not at every probe while it lasts);
- ``freeze``: stop the EMA for the rest of the run (the teacher stays where it was at the drop);
- ``reset``: put back the teacher as it was at the last probe that was not a drop (a copy is kept
  at each such probe), then let the EMA go on from it; every probe that reads a drop resets again.
Pure Python: no torch, no Ray; ``apply`` is the one call the training loop makes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["none", "snapshot", "warn", "freeze", "reset"]


@dataclass
class Decision:
    action: Action  # what the learners must do now ("snapshot": keep a copy of the teacher)
    message: str | None = None  # for the console and the log, when something happened
    metrics: dict[str, float] = field(default_factory=dict)


class TeacherGuard:
    def __init__(self, mode: str, margin: float):
        if mode not in ("off", "warn", "freeze", "reset"):
            raise ValueError(f"teacher.guard must be off, warn, freeze or reset, got {mode!r}")
        if not 0.0 <= margin <= 1.0:
            raise ValueError(f"teacher.guard_margin must be in [0, 1], got {margin}")
        self.mode, self.margin = mode, margin
        self.best: float | None = None
        self.best_step = -1
        self.dropped = False  # the last reading was a drop
        self.drops = 0  # readings that started a drop (warn, freeze) or caused a reset
        self.frozen = False
        self.snapshot_step: int | None = None  # the step of the copy a reset would restore

    @classmethod
    def from_config(cls, cfg) -> "TeacherGuard":
        return cls(cfg.teacher.guard, cfg.teacher.guard_margin)

    def observe(self, step: int, probe: dict[str, float]) -> Decision:
        """The decision for one probe reading (``probe_teacher``'s metrics). Updates the guard's state."""
        success = probe.get("probe/teacher_success")
        if self.mode == "off" or success is None:  # None: no held-out sample had a teacher context
            return Decision("none")
        if self.best is None or success > self.best:
            self.best, self.best_step = success, step
        drop = success < self.best - self.margin
        started = drop and not self.dropped
        self.dropped = drop
        action: Action = "none"
        message = None
        if not drop:
            if self.mode == "reset":
                action, self.snapshot_step = "snapshot", step
        else:
            what = (f"probe/teacher_success {success:.3f} at step {step} is more than {self.margin:g} below its "
                    f"best {self.best:.3f} (step {self.best_step})")
            if self.mode == "warn" and started:
                action, message = "warn", f"teacher guard: {what}; teacher.guard=warn, so training goes on unchanged"
            elif self.mode == "freeze" and not self.frozen:
                self.frozen = True
                action, message = "freeze", f"teacher guard: {what}; freezing the EMA teacher for the rest of the run"
            elif self.mode == "reset":
                if self.snapshot_step is None:
                    # After a resume no copy exists yet (copies live in learner memory, not checkpoints).
                    if not self.frozen:
                        self.frozen = True
                        action, message = "freeze", (f"teacher guard: {what}; no good copy since the run (re)started, "
                                                     "so freezing instead of resetting")
                else:
                    action = "reset"
                    message = f"teacher guard: {what}; resetting the teacher to its copy of step {self.snapshot_step}"
            if action != "none":
                self.drops += 1
        metrics = {"guard/teacher_success_best": self.best, "guard/drop": float(drop),
                   "guard/drops": float(self.drops), "guard/frozen": float(self.frozen)}
        return Decision(action, message, metrics)

    def apply(self, step: int, probe: dict[str, float], learners, say: Callable[[str], None]) -> dict[str, float]:
        """``observe``, then have ``learners`` act on the decision and ``say`` its message; returns
        the metrics to log next to the probe's."""
        decision = self.observe(step, probe)
        if decision.action == "snapshot":
            learners.call("snapshot_teacher")
        elif decision.action == "freeze":
            learners.call("freeze_teacher")
        elif decision.action == "reset":
            learners.call("reset_teacher")
        if decision.message:
            say(decision.message)
        return decision.metrics

    def state(self) -> dict:
        """For the driver's checkpoint state (the teacher copy itself is not saved)."""
        return {"best": self.best, "best_step": self.best_step, "dropped": self.dropped, "drops": self.drops,
                "frozen": self.frozen}

    def load_state(self, state: dict | None, learners) -> None:
        """Back to ``state`` (None: a fresh guard) on a new or restored learner group: a frozen
        teacher is frozen again; a reset has no copy to go back to until the next good probe."""
        self.__init__(self.mode, self.margin)
        if state:
            self.best, self.best_step, self.dropped = state["best"], state["best_step"], state["dropped"]
            self.drops, self.frozen = state["drops"], state["frozen"]
        if self.frozen:
            learners.call("freeze_teacher")
