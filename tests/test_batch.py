"""The driver's bookkeeping: group-relative advantages and offline demonstrations in build_batch."""

import pytest

from environments import Task, Verdict
from sdpo.batch import build_batch, group_advantages
from sdpo.config import TeacherContextConfig
from sdpo.rollout.base import Completion
from sdpo.tiny.tokenizer import build_tokenizer


def test_group_advantages_by_hand():
    # mean 0.25; sample std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    assert group_advantages([1, 0, 0, 0], std_normalize=True) == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5)
    assert group_advantages([1, 0, 0, 0], std_normalize=False) == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert group_advantages([1, 1, 1], std_normalize=True) == [0.0, 0.0, 0.0]  # no spread, no signal
    assert group_advantages([0.3], std_normalize=True) == [0.0]


@pytest.mark.parametrize("source, solution_in_teacher", [("rollouts", False), ("dataset", True), ("both", True)])
def test_build_batch_uses_the_dataset_demonstration_per_source(source, solution_in_teacher):
    tok = build_tokenizer()
    task = Task(id="0", messages=[{"role": "user", "content": "12+3"}], demonstration="15")
    prompt = tok.encode("P")
    group = [Completion(token_ids=tok.encode("14"), logprobs=[-1.0, -1.0], finish_reason="length"), Completion(token_ids=tok.encode("13"), logprobs=[-1.0, -1.0], finish_reason="length")]
    verdicts = [Verdict(0.0), Verdict(0.0)]
    cfg = TeacherContextConfig(demonstration_source=source)
    samples, stats = build_batch([task], [prompt], [group], [verdicts], tok, cfg)
    assert [s.sd_mask for s in samples] == [int(solution_in_teacher)] * 2
    assert stats["teacher/with_solution_frac"] == float(solution_in_teacher)
    teacher_text = tok.decode(samples[0].teacher_prompt_ids)
    assert ("Correct solution:\n\n15" in teacher_text) == solution_in_teacher
    assert [s.advantage for s in samples] == [0.0, 0.0]  # equal rewards
