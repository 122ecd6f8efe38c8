"""Built-in environments (math, mcq, tooluse) and the loaders, offline on the bundled samples."""

import json

import pytest

from environments import Environment, Task, Verdict, load_environment
from environments.loaders import load_rows
from environments.math import Math, extract_answer, last_boxed
from environments.mcq import MCQ
from environments.tooluse import ToolUse, parse_actions


def test_math_extracts_the_last_box_with_nested_braces_or_the_answer_tag():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{a}{b^{2}}} end") == r"\frac{a}{b^{2}}"
    assert extract_answer("<answer> 7 </answer>") == "7"
    assert extract_answer(r"<answer>7</answer> \boxed{8}") == "8"  # a box wins over a tag
    assert extract_answer(r"\boxed{unclosed") is None and extract_answer("no answer") is None


@pytest.mark.parametrize("completion, reward", [
    (r"so \boxed{\dfrac{10}{12}}", 1.0), (r"\boxed{0.83}", 0.0), (r"\boxed{5/6}", 1.0),
    (r"\boxed{\frac{6}{5}}", 0.0), ("no final answer", 0.0),
])
def test_math_checks_equivalence_not_strings(completion, reward):
    env = Math()
    task = next(t for t in env.tasks("train") if t.id == "math-1")  # answer 5/6, read from the solution's box
    assert env.verify(task, completion).reward == reward


def test_math_reads_gsm8k_answers_and_gives_optional_feedback():
    env = Math(feedback=True)
    tasks = {t.id: t for t in env.tasks("train")}
    assert tasks["gsm-1"].data["answer"] == "72" and tasks["gsm-2"].data["answer"] == "8400"
    assert env.verify(tasks["gsm-2"], r"\boxed{8400}").reward == 1.0
    wrong = env.verify(tasks["gsm-1"], r"\boxed{71}")
    assert wrong.reward == 0.0 and "71" in wrong.feedback
    assert Math().verify(tasks["gsm-1"], r"\boxed{71}").feedback is None


def test_mcq_rewards_only_the_exact_letter_in_the_last_tag_and_never_gives_feedback():
    env = MCQ(domain="Chemistry")
    tasks = env.tasks("test")
    assert [t.id for t in tasks] == ["chem-1", "chem-2"]
    assert "B. Hydrogen" in tasks[0].messages[0]["content"]
    cases = {"<answer>B</answer>": 1.0, "<answer> B </answer>": 1.0, "<answer>A</answer><answer>B</answer>": 1.0,
             "<answer>b</answer>": 0.0, "<answer>B. Hydrogen</answer>": 0.0, "B": 0.0, "<answer>B</answer><answer>C</answer>": 0.0}
    for completion, reward in cases.items():
        verdict = env.verify(tasks[0], completion)
        assert (verdict.reward, verdict.feedback) == (reward, None), completion
    assert [t.data["answer"] for t in MCQ(level="L2").tasks("train")] == ["C"]  # list choices, 'answer' field


def test_tooluse_parses_actions_and_multiline_json():
    actions, problems = parse_actions('Thought: hi\nAction: a\nAction Input: {"x": 1,\n "y": [1, 2]}\nObservation: ok\nAction: b\n')
    assert actions == [("a", {"x": 1, "y": [1, 2]}), ("b", None)] and len(problems) == 1


def test_tooluse_rewards_multiset_and_merged_inputs_and_names_the_mismatch():
    env = ToolUse()
    tasks = {t.id: t for t in env.tasks("train")}
    assert env.verify(tasks["weather"], tasks["weather"].demonstration).reward == 1.0
    pets_ok = 'Action: findPetsByStatus\nAction Input: {"status": "available"}\nAction: addPet\nAction Input: {"species": "dog", "name": "Rex"}'
    assert env.verify(tasks["pets"], pets_ok).reward == 1.0  # order free, inputs merged
    once = 'Action: convert\nAction Input: {"amount": 100, "from": "USD", "to": "JPY"}'
    verdict = env.verify(tasks["convert"], once)  # same merged inputs, but one call short
    assert verdict.reward == 0.0 and "Missing actions: convert" in verdict.feedback
    wrong = env.verify(tasks["weather"], 'Action: getForecast\nAction Input: {"city": "Bern", "days": 1}')
    assert wrong.reward == 0.0 and "Wrong value for 'city'" in wrong.feedback and "Missing argument 'unit'" in wrong.feedback
    assert "No 'Action:' line" in env.verify(tasks["weather"], "It will be sunny.").feedback
    assert ToolUse(feedback=False).verify(tasks["weather"], "sunny").feedback is None


def test_loaders_read_json_jsonl_and_parquet_files(tmp_path):
    rows = [{"question": "q1", "choices": ["x", "y"], "answer": "A"}, {"question": "q2", "choices": ["x", "y"], "answer": "B"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "{split}.jsonl", "d.parquet"):
        assert load_rows(str(tmp_path / name), "train") == rows
        assert [t.data["answer"] for t in MCQ(dataset=str(tmp_path / name)).tasks("train")] == ["A", "B"]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"), "train")
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"), "train")
    (tmp_path / "noanswer.jsonl").write_text(json.dumps({"question": "q", "choices": ["a"]}))
    with pytest.raises(ValueError, match="no 'answer'"):
        MCQ(dataset=str(tmp_path / "noanswer.jsonl")).tasks("train")


def test_hub_names_go_to_datasets_lazily_and_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load hub dataset 'no-such-org/no-such-set'.*local .json"):
        load_rows("no-such-org/no-such-set", "train")


def test_environments_import_neither_torch_nor_ray():
    import subprocess
    import sys

    code = ("import sys; import environments, environments.math, environments.mcq, environments.tooluse, environments.code, "
            "environments.sandbox, environments.arithmetic; print(sorted({'torch', 'ray', 'datasets'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_user_environment_loads_from_a_file_outside_any_package(tmp_path):
    (tmp_path / "helper.py").write_text("ANSWER = '42'\n")
    (tmp_path / "my_env.py").write_text(
        "from environments import Environment, Task, Verdict\nfrom helper import ANSWER\n"
        "class Mine(Environment):\n    def __init__(self, bonus=0.0):\n        self.bonus = bonus\n"
        "    def tasks(self, split):\n        return [Task(id='0', messages=[{'role': 'user', 'content': '?'}])]\n"
        "    def verify(self, task, completion):\n        return Verdict(float(completion == ANSWER) * self.bonus)\n")
    env = load_environment(f"{tmp_path}/my_env.py:Mine", {"bonus": 0.5})
    assert isinstance(env, Environment) and env.verify(env.tasks("train")[0], "42").reward == 0.5
    with pytest.raises(ValueError, match="does not exist"):
        load_environment(f"{tmp_path}/nope.py:Mine")
    with pytest.raises(ValueError, match="has no 'Other'"):
        load_environment(f"{tmp_path}/my_env.py:Other")
    with pytest.raises(ValueError, match="do not fit Mine"):
        load_environment(f"{tmp_path}/my_env.py:Mine", {"bonsu": 1})


def test_the_group_hook_defaults_to_the_verdicts_unchanged():
    verdicts = [Verdict(1.0), Verdict(0.0, "x")]
    assert Environment().review_group(Task("t", []), ["a", "b"], verdicts) is verdicts
