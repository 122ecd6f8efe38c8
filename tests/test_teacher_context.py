"""SPEC section 2: how each sample's teacher prompt is built from its group."""

import pytest

from sdpo.config import TeacherContextConfig
from sdpo.teacher_context import build_teacher_contexts, remove_thinking, truncate_prompt_ids

Q = [{"role": "user", "content": "12+3"}]
SUFFIX = "\n\nCorrectly solve the original question."
FB_HEAD = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"


def build(completions, rewards, feedbacks=None, messages=Q, demonstration=None, **cfg):
    feedbacks = feedbacks if feedbacks is not None else [None] * len(completions)
    return build_teacher_contexts(
        messages, completions, rewards, feedbacks, TeacherContextConfig(**cfg), demonstration=demonstration
    )


def user_text(ctx):
    return ctx.messages[-1]["content"]


def test_exact_solution_template():
    ctxs = build(["14", "15"], [0.0, 1.0])
    assert user_text(ctxs[0]) == "12+3\nCorrect solution:\n\n15\n\nCorrectly solve the original question."
    assert ctxs[0].sd_mask == 1 and ctxs[0].has_solution and not ctxs[0].has_feedback
    assert ctxs[0].messages == [{"role": "user", "content": user_text(ctxs[0])}]


def test_exact_feedback_template():
    ctxs = build(["14"], [0.0], ["Wrong answer: expected 15"])
    assert user_text(ctxs[0]) == (
        "12+3\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
        "Wrong answer: expected 15\n\nCorrectly solve the original question."
    )
    assert ctxs[0].sd_mask == 1 and ctxs[0].has_feedback and not ctxs[0].has_solution


def test_first_success_in_batch_order_teaches_all_failures():
    ctxs = build(["a", "S1", "b", "S2", "c"], [0, 1, 0, 1, 0])
    for i in (0, 2, 4):
        assert user_text(ctxs[i]) == "12+3\nCorrect solution:\n\nS1" + SUFFIX


def test_self_exclusion_first_success_gets_second():
    ctxs = build(["a", "S1", "b", "S2"], [0, 1, 0, 1])
    assert user_text(ctxs[1]) == "12+3\nCorrect solution:\n\nS2" + SUFFIX
    assert user_text(ctxs[3]) == "12+3\nCorrect solution:\n\nS1" + SUFFIX


def test_without_self_exclusion_a_success_sees_the_first_success():
    ctxs = build(["a", "S1", "S2"], [0, 1, 1], dont_reprompt_on_self_success=False)
    assert user_text(ctxs[1]) == "12+3\nCorrect solution:\n\nS1" + SUFFIX  # itself
    assert user_text(ctxs[2]) == "12+3\nCorrect solution:\n\nS1" + SUFFIX


def test_lone_success_gets_nothing():
    ctxs = build(["a", "S1", "b"], [0, 1, 0])
    assert ctxs[1].sd_mask == 0 and not ctxs[1].has_solution
    assert ctxs[1].messages == Q
    assert ctxs[0].sd_mask == 1 and ctxs[2].sd_mask == 1


def test_lone_success_with_its_own_feedback_gets_feedback():
    ctxs = build(["a", "S1"], [0, 1], ["fa", "style could be better"])
    assert ctxs[1].sd_mask == 1 and ctxs[1].has_feedback and not ctxs[1].has_solution
    assert user_text(ctxs[1]) == "12+3" + FB_HEAD + "style could be better" + SUFFIX


def test_all_failures_no_feedback_unchanged():
    ctxs = build(["a", "b"], [0, 0])
    for c in ctxs:
        assert c.sd_mask == 0 and c.messages == Q and not c.has_solution and not c.has_feedback


def test_feedback_only_without_solution():
    ctxs = build(["a", "b"], [0, 0], ["fa", "fb"])
    assert user_text(ctxs[0]) == "12+3" + FB_HEAD + "fa" + SUFFIX
    assert user_text(ctxs[1]) == "12+3" + FB_HEAD + "fb" + SUFFIX  # its own, not a sibling's


def test_feedback_suppressed_when_solution_exists():
    ctxs = build(["a", "S1"], [0, 1], ["fa", None])
    assert user_text(ctxs[0]) == "12+3\nCorrect solution:\n\nS1" + SUFFIX
    assert ctxs[0].has_solution and not ctxs[0].has_feedback


def test_solution_and_feedback_both_when_allowed():
    ctxs = build(["a", "S1"], [0, 1], ["fa", None], environment_feedback_only_without_solution=False)
    assert user_text(ctxs[0]) == (
        "12+3\nCorrect solution:\n\nS1"
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\nfa"
        "\n\nCorrectly solve the original question."
    )
    assert ctxs[0].has_solution and ctxs[0].has_feedback and ctxs[0].sd_mask == 1


@pytest.mark.parametrize("blank", ["", "   ", "\n\t \n", None])
def test_blank_feedback_ignored(blank):
    ctxs = build(["a"], [0], [blank])
    assert ctxs[0].sd_mask == 0 and not ctxs[0].has_feedback and ctxs[0].messages == Q


def test_feedback_kept_raw_when_not_blank():
    ctxs = build(["a"], [0], ["  line\n"])
    assert user_text(ctxs[0]) == "12+3" + FB_HEAD + "  line\n" + SUFFIX


def test_include_environment_feedback_false():
    ctxs = build(["a", "b"], [0, 0], ["fa", "fb"], include_environment_feedback=False)
    assert all(c.sd_mask == 0 and not c.has_feedback and c.messages == Q for c in ctxs)


def test_sample_only_sees_its_own_feedback():
    ctxs = build(["a", "b", "c"], [0, 0, 0], ["only a", None, "only c"])
    assert "only a" in user_text(ctxs[0]) and "only c" not in user_text(ctxs[0])
    assert ctxs[1].sd_mask == 0 and ctxs[1].messages == Q
    assert "only c" in user_text(ctxs[2]) and "only a" not in user_text(ctxs[2])


def test_remove_thinking():
    text = "<think>first\nidea</think>\n\nA <think>second\n\nthought</think>  \n B<think></think>C"
    assert remove_thinking(text) == "A B" + "C"
    assert remove_thinking("no think here") == "no think here"
    # Non-greedy: text between two blocks survives.
    assert remove_thinking("<think>x</think>keep<think>y</think>") == "keep"


def test_thinking_removed_from_demonstration_only():
    completions = ["<think>hmm</think>\n14", "<think>let me\nsee</think>\n\n15"]
    ctxs = build(completions, [0, 1])
    assert user_text(ctxs[0]) == "12+3\nCorrect solution:\n\n15" + SUFFIX
    assert completions == ["<think>hmm</think>\n14", "<think>let me\nsee</think>\n\n15"]  # scored text untouched


def test_thinking_kept_when_flag_off():
    ctxs = build(["a", "<think>t</think>\n15"], [0, 1], remove_thinking_from_demonstration=False)
    assert user_text(ctxs[0]) == "12+3\nCorrect solution:\n\n<think>t</think>\n15" + SUFFIX


def test_system_and_earlier_turns_kept():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "12+3"},
    ]
    original = [dict(m) for m in messages]
    ctxs = build(["a", "15"], [0, 1], messages=messages)
    assert ctxs[0].messages[:3] == original[:3]
    assert ctxs[0].messages[3] == {"role": "user", "content": "12+3\nCorrect solution:\n\n15" + SUFFIX}
    assert ctxs[1].messages == original
    assert messages == original  # input not mutated


def test_prompt_is_last_user_message_even_if_not_last_message():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "prefill"}]
    ctxs = build(["a", "S"], [0, 1], messages=messages)
    assert ctxs[0].messages == [
        {"role": "user", "content": "q\nCorrect solution:\n\nS" + SUFFIX},
        {"role": "assistant", "content": "prefill"},
    ]


def test_template_fields_with_braces_are_not_formatted():
    messages = [{"role": "user", "content": "dict {x}"}]
    ctxs = build(["a", "def f(): return {1: 2}"], [0, 1], messages=messages)
    assert user_text(ctxs[0]) == "dict {x}\nCorrect solution:\n\ndef f(): return {1: 2}" + SUFFIX


def test_success_threshold():
    ctxs = build(["a", "b", "c"], [0.4, 0.7, 0.9], success_threshold=0.7)
    assert user_text(ctxs[0]) == "12+3\nCorrect solution:\n\nb" + SUFFIX
    assert user_text(ctxs[1]) == "12+3\nCorrect solution:\n\nc" + SUFFIX
    # reward == threshold is a success
    ctxs = build(["a", "b"], [0.0, 0.5])
    assert ctxs[0].has_solution
    ctxs = build(["a", "b"], [0.0, 0.49])
    assert not ctxs[0].has_solution


def test_offline_demonstration_both_is_fallback():
    # No sibling success: every sample is taught from the offline demonstration.
    ctxs = build(["a", "b"], [0, 0], demonstration="<think>x</think>\n15", demonstration_source="both")
    assert all(user_text(c) == "12+3\nCorrect solution:\n\n15" + SUFFIX for c in ctxs)
    # A sibling success wins; the lone success falls back to the offline demonstration.
    ctxs = build(["a", "S1"], [0, 1], demonstration="D", demonstration_source="both")
    assert user_text(ctxs[0]) == "12+3\nCorrect solution:\n\nS1" + SUFFIX
    assert user_text(ctxs[1]) == "12+3\nCorrect solution:\n\nD" + SUFFIX


def test_offline_demonstration_dataset_only_is_sdft():
    # SDFT: siblings never teach, even successful ones; every sample sees the dataset's demonstration.
    ctxs = build(["a", "S1", "S2"], [0, 1, 1], demonstration="D", demonstration_source="dataset")
    assert [user_text(c) for c in ctxs] == ["12+3\nCorrect solution:\n\nD" + SUFFIX] * 3
    assert all(c.sd_mask == 1 and c.has_solution for c in ctxs)
    # Without a demonstration, feedback is still the sample's own.
    ctxs = build(["a", "S1"], [0, 1], feedbacks=["bad", None], demonstration_source="dataset")
    assert ctxs[0].has_feedback and not ctxs[0].has_solution and ctxs[1].sd_mask == 0


def test_offline_demonstration_ignored_by_default():
    # SDPO proper ("rollouts"): a dataset demonstration is not used, so a group with no success gets nothing.
    ctxs = build(["a", "b"], [0, 0], demonstration="D")
    assert all(c.sd_mask == 0 for c in ctxs)


def test_errors():
    with pytest.raises(ValueError, match="no user message"):
        build(["a"], [0], messages=[{"role": "system", "content": "s"}])
    with pytest.raises(ValueError, match="one per sample"):
        build(["a", "b"], [0])


def test_truncate_prompt_ids():
    ids = list(range(10))
    assert truncate_prompt_ids(ids, 4, "left") == [6, 7, 8, 9]
    assert truncate_prompt_ids(ids, 4, "right") == [0, 1, 2, 3]
    for policy in ("left", "right", "error"):
        assert truncate_prompt_ids(ids, 10, policy) == ids
        assert truncate_prompt_ids(ids, 50, policy) == ids
    with pytest.raises(ValueError, match=r"teacher_context\.max_teacher_prompt_tokens.*4") as e:
        truncate_prompt_ids(ids, 4, "error")
    assert "10" in str(e.value)
    with pytest.raises(ValueError):
        truncate_prompt_ids(ids, 4, "middle")
