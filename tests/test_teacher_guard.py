"""The teacher guard's decisions (sdpo/teacher_guard.py), reading by reading; the learners' hands
(freeze, snapshot, reset) are tested on real FSDP2 ranks in tests/test_learner.py."""

import pytest

from sdpo.config import Config
from sdpo.teacher_guard import TeacherGuard


def readings(guard, values, start=0, every=10):
    return [guard.observe(start + i * every, {"probe/teacher_success": v}) for i, v in enumerate(values)]


def test_warn_once_per_drop():
    guard = TeacherGuard("warn", 0.1)
    out = readings(guard, [0.5, 0.6, 0.55, 0.45, 0.40, 0.55, 0.3])
    assert [d.action for d in out] == ["none", "none", "none", "warn", "none", "none", "warn"]
    assert "0.450 at step 30" in out[3].message and "best 0.600 (step 10)" in out[3].message
    assert [d.metrics["guard/drop"] for d in out] == [0, 0, 0, 1, 1, 0, 1]
    assert out[-1].metrics == {"guard/teacher_success_best": 0.6, "guard/drop": 1.0, "guard/drops": 2.0, "guard/frozen": 0.0}


def test_margin_is_strict():
    guard = TeacherGuard("warn", 0.25)
    assert [d.action for d in readings(guard, [0.5, 0.25, 0.2499])] == ["none", "none", "warn"]


def test_freeze_once_and_stays_frozen():
    guard = TeacherGuard("freeze", 0.1)
    out = readings(guard, [0.6, 0.45, 0.3, 0.7, 0.2])
    assert [d.action for d in out] == ["none", "freeze", "none", "none", "none"]
    assert out[-1].metrics["guard/frozen"] == 1.0 and out[-1].metrics["guard/drops"] == 1.0


def test_reset_snapshots_every_good_reading_and_resets_on_each_drop():
    guard = TeacherGuard("reset", 0.1)
    out = readings(guard, [0.5, 0.45, 0.3, 0.35, 0.5, 0.2])
    assert [d.action for d in out] == ["snapshot", "snapshot", "reset", "reset", "snapshot", "reset"]
    assert "copy of step 10" in out[2].message and "copy of step 40" in out[5].message
    assert out[-1].metrics["guard/drops"] == 3.0


def test_no_reading_and_off_do_nothing():
    guard = TeacherGuard("freeze", 0.1)
    assert guard.observe(0, {"probe/student_success": 0.1, "probe/contexts": 0.0}).action == "none"
    assert guard.best is None
    off = TeacherGuard("off", 0.1)
    assert [d.action for d in readings(off, [0.9, 0.0])] == ["none", "none"]


class Hands:
    def __init__(self):
        self.calls = []

    def call(self, method: str):
        self.calls.append(method.removesuffix("_teacher"))


def test_apply_drives_the_learners_and_says_why():
    guard, hands, said = TeacherGuard("reset", 0.1), Hands(), []
    for step, value in [(0, 0.5), (10, 0.3)]:
        metrics = guard.apply(step, {"probe/teacher_success": value}, hands, said.append)
    assert hands.calls == ["snapshot", "reset"]
    assert len(said) == 1 and "resetting the teacher to its copy of step 0" in said[0]
    assert metrics["guard/drop"] == 1.0


def test_state_round_trip_refreezes_and_reset_without_copy_freezes():
    guard = TeacherGuard("freeze", 0.1)
    readings(guard, [0.6, 0.4])
    hands = Hands()
    resumed = TeacherGuard("freeze", 0.1)
    resumed.load_state(guard.state(), hands)
    assert hands.calls == ["freeze"] and resumed.best == 0.6 and resumed.frozen

    reset = TeacherGuard("reset", 0.1)
    readings(reset, [0.6, 0.55])
    again, hands = TeacherGuard("reset", 0.1), Hands()
    again.load_state(reset.state(), hands)
    decision = again.observe(30, {"probe/teacher_success": 0.3})  # no copy since the resume
    assert decision.action == "freeze" and "no good copy" in decision.message
    fresh = TeacherGuard("reset", 0.1)
    fresh.load_state(None, hands)
    assert fresh.best is None


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="teacher.guard must be"):
        TeacherGuard("panic", 0.1)
    with pytest.raises(ValueError, match="teacher_probe_every_steps"):
        Config(teacher={"guard": "warn"})
    with pytest.raises(ValueError, match="use teacher.guard=warn"):
        Config(teacher={"guard": "reset", "kind": "frozen"}, eval={"teacher_probe_every_steps": 5})
    assert Config(teacher={"guard": "reset"}, eval={"teacher_probe_every_steps": 5}).teacher.guard == "reset"
