"""The rich-feedback task (environments/pair_sums.py) and its warm-started model
(models/tiny_pairsums.py). CPU only, no network; the model tests use a build of a few steps
(seconds), not the full warm start."""

from __future__ import annotations

import random

import pytest
import torch

from environments import load_environment
from environments.pair_sums import PairSums, answer, marks, parse_fields, question, split_questions
from models.tiny_pairsums import synthetic_attempt, teacher_text, train_feedback_model
from sdpo.config import TeacherContextConfig
from sdpo.teacher_context import build_teacher_contexts
from sdpo.tiny.tokenizer import chat_ids

TASK_PAIRS = [(3, 5), (7, 8), (2, 2), (9, 4)]


def _make(pairs):
    from environments.base import Task

    return Task(id="t", messages=[{"role": "user", "content": question(pairs)}], data={"answer": answer(pairs)})


def test_question_and_answer_format():
    assert question(TASK_PAIRS) == "add pairs: 35 78 22 94"
    assert answer(TASK_PAIRS) == "08 15 04 13"
    assert parse_fields("08 15 04 13", 4) == [8, 15, 4, 13]
    assert parse_fields(" 08 15 04 13\n", 4) == [8, 15, 4, 13]
    for bad in ("08 15 04", "8 15 04 13", "08 15 04 13 00", "08  15 04 13", "0x 15 04 13", ""):
        assert parse_fields(bad, 4) is None, bad


def test_right_answer_scores_one_without_feedback():
    env = PairSums()
    v = env.verify(_make(TASK_PAIRS), "08 15 04 13")
    assert v.reward == 1.0 and v.feedback is None
    assert env.verify(_make(TASK_PAIRS), " 08 15 04 13 \n").reward == 1.0


def test_feedback_marks_each_field_and_aligns():
    env = PairSums(reveal=2)
    v = env.verify(_make(TASK_PAIRS), "08 14 05 12")
    assert v.reward == 0.0
    got_line, mark_line = v.feedback.split("\n")
    assert got_line == "got  08 14 05 12"
    # 15 and 04 are the first two wrong fields: their right values; the third wrong one: a direction.
    assert mark_line == "mark ok 15 04 lo"
    # Each mark sits under the field it judges.
    for i in range(4):
        col = 5 + 3 * i
        assert got_line[col:col + 2] == "08 14 05 12".split()[i]
    assert len(got_line) == len(mark_line)


def test_directions_when_nothing_is_revealed():
    assert marks([9, 14, 4, 20], [8, 15, 4, 13], reveal=0) == ["hi", "lo", "ok", "hi"]
    assert marks([9, 14, 4, 20], [8, 15, 4, 13], reveal=1) == ["08", "lo", "ok", "hi"]


def test_feedback_never_prints_the_whole_answer():
    rng = random.Random(0)
    env = PairSums(fields=4, reveal=2)
    for t in env.tasks("test")[:50]:
        expected = t.data["answer"].split(" ")
        wrong = " ".join(f"{(int(e) + rng.randint(1, 5)) % 19:02d}" for e in expected)  # every field wrong
        v = env.verify(t, wrong)
        assert v.reward == 0.0
        mark_fields = v.feedback.split("\n")[1].split()[1:]
        assert sum(m.isdigit() for m in mark_fields) == 2  # only `reveal` right values shown
        assert t.data["answer"] not in v.feedback


def test_malformed_answer_gets_format_feedback():
    env = PairSums()
    v = env.verify(_make(TASK_PAIRS), "8 15 4 13")
    assert v.reward == 0.0
    assert "not 4 two-digit sums" in v.feedback and "'8 15 4 13'" in v.feedback
    long = env.verify(_make(TASK_PAIRS), "9" * 500)
    assert len(long.feedback) < 200  # the quote is cut


def test_field_accuracy_is_reported_for_every_verdict():
    """Partial progress under the all-or-nothing reward: the fraction of fields right, logged by the
    run as env/field_accuracy (sdpo.trainer.env_metrics averages it over the samples)."""
    from sdpo.trainer import env_metrics

    env, task = PairSums(reveal=2), _make(TASK_PAIRS)
    verdicts = [env.verify(task, a) for a in ("08 15 04 13", "08 14 04 12", "8 15 4 13", "08 15", "08 15 04 13 00")]
    verdicts.append(PairSums(feedback=False).verify(task, "08 15 05 13"))
    # position by position: too few or too many fields still count the ones in place
    assert [v.info["metrics"]["field_accuracy"] for v in verdicts] == [1.0, 0.5, 0.5, 0.5, 1.0, 0.75]
    assert env_metrics(verdicts, "env/{}") == {"env/field_accuracy": 4.25 / 6}
    # samples without the metric (a verifier failure's verdict) are left out of the mean, not counted as 0
    from environments import Verdict

    assert env_metrics(verdicts[:2] + [Verdict(0.0, info={"verifier_failure": "error"})], "eval/{}_t") == \
        {"eval/field_accuracy_t": 0.75}


def test_no_feedback_mode():
    v = PairSums(feedback=False).verify(_make(TASK_PAIRS), "08 14 04 13")
    assert v.reward == 0.0 and v.feedback is None


def test_splits_are_deterministic_and_disjoint():
    test, train = split_questions("test", 4), split_questions("train", 4)
    assert test == split_questions("test", 4)
    assert len(test) == 256 and len(train) == 20_000
    assert not {tuple(q) for q in test} & {tuple(q) for q in train}
    assert split_questions("test", 5) != test  # the knob changes the task
    with pytest.raises(ValueError, match="splits"):
        split_questions("dev", 4)


def test_bad_knobs_name_the_fix():
    with pytest.raises(ValueError, match="reveal=4"):
        PairSums(fields=4, reveal=4)
    with pytest.raises(ValueError, match="fields=0"):
        PairSums(fields=0)


def test_loads_by_import_path_with_recipe_kwargs():
    env = load_environment("environments.pair_sums:PairSums", {"fields": 6, "reveal": 1})
    t = env.tasks("train")[0]
    assert len(t.data["answer"].split(" ")) == 6
    assert t.messages[0]["content"].startswith("add pairs: ")


def test_warmstart_teacher_text_is_what_training_builds():
    """The warm start teaches feedback through the exact teacher context SDPO builds (SPEC 2)."""
    env, task = PairSums(), _make(TASK_PAIRS)
    attempts = ["08 14 05 12", "09 15 04 13"]
    verdicts = [env.verify(task, a) for a in attempts]
    cfg = TeacherContextConfig()
    contexts = build_teacher_contexts(task.messages, attempts, [v.reward for v in verdicts],
                                      [v.feedback for v in verdicts], cfg)
    for c, v in zip(contexts, verdicts):
        assert c.has_feedback
        assert c.messages[-1]["content"] == teacher_text(task.messages[-1]["content"], feedback=v.feedback)
    assert teacher_text("q", solution="08").endswith("\nCorrect solution:\n\n08\n\nCorrectly solve the original question.")


def test_synthetic_attempts_are_wrong():
    rng = random.Random(1)
    for pairs in split_questions("train", 4)[:300]:
        attempt = synthetic_attempt(pairs, rng)
        assert attempt != answer(pairs)


@pytest.mark.slow
def test_tiny_build_is_deterministic_and_generates():
    """A few-step build (not the real warm start): same seed, same weights; the model generates."""
    sizes = {"plain": 16, "feedback": 16, "solution": 8}
    logs: list[str] = []
    m1, tok, metrics = train_feedback_model(max_steps=3, pool_sizes=sizes, eval_tasks=4, log=logs.append)
    m2, _, _ = train_feedback_model(max_steps=3, pool_sizes=sizes, eval_tasks=4, log=lambda _: None)
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p1, p2), name
    assert metrics["steps"] == 3 and metrics["name"] == "tiny-pairsums-v1"
    assert any("targets missed" in line for line in logs)  # 3 steps cannot reach 5%: said, not hidden
    ids = chat_ids(tok, [{"role": "user", "content": question(TASK_PAIRS)}])
    out = m1.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(ids)


@pytest.mark.slow
def test_saved_model_loads_as_hf_folder(tmp_path):
    """What ensure_feedback_model writes is a plain Hugging Face folder that gives the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo.models import check_model_path
    from sdpo.tiny.cache import save_model

    check_model_path("tiny-pairsums")  # an embedded name: accepted without building anything
    model, tok, metrics = train_feedback_model(max_steps=1, pool_sizes={"plain": 4, "feedback": 4, "solution": 4},
                                               eval_tasks=2, log=lambda _: None)
    save_model(model, tok, metrics, str(tmp_path))
    loaded, tok2 = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    text = "add pairs: 35 78 22 94"
    assert tok2.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    ids = torch.tensor([chat_ids(tok, [{"role": "user", "content": text}])])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
