"""The driver's bookkeeping: group-relative advantages and offline demonstrations in build_batch."""

import pytest

from environments import Task, Verdict
from sdpo.batch import build_batch
from sdpo.config import TeacherContextConfig
from sdpo.rollout.base import Completion
from sdpo.tiny.tokenizer import build_tokenizer


@pytest.mark.parametrize("source, solution_in_teacher", [("rollouts", False), ("dataset", True), ("both", True)])
def test_build_batch_uses_the_dataset_demonstration_per_source(source, solution_in_teacher):
    tok = build_tokenizer()
    task = Task(id="0", messages=[{"role": "user", "content": "12+3"}], demonstration="15")
    prompt = tok.encode("P")
    group = [Completion(token_ids=tok.encode("14"), logprobs=[-1.0, -1.0], finish_reason="length"),
             Completion(token_ids=tok.encode("13"), logprobs=[-1.0, -1.0], finish_reason="length")]
    verdicts = [Verdict(0.0), Verdict(0.0)]
    cfg = TeacherContextConfig(demonstration_source=source)
    samples, stats = build_batch([task], [prompt], [group], [verdicts], tok, cfg)
    assert [s.sd_mask for s in samples] == [int(solution_in_teacher)] * 2
    assert stats["teacher/with_solution_frac"] == float(solution_in_teacher)
    teacher_text = tok.decode(samples[0].teacher_prompt_ids)
    assert ("Correct solution:\n\n15" in teacher_text) == solution_in_teacher
    assert [s.advantage for s in samples] == [0.0, 0.0]  # equal rewards
