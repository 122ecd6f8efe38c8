"""What a user can get wrong, and the error each gets: `python -m sdpo.run` exits with code 2 and a
message naming the key and what to fix, before Ray is even imported (the table: docs/bad_input.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo.recipe import load_config
from sdpo.run import preflight

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = "recipes/quickstart.yaml"

# `python -m sdpo.run ARGS` through runpy (what -m does), then a note on stderr if anything imported
# Ray: every error below must come before that.
RUN_AS_MAIN = """
import runpy, sys
sys.argv = ["sdpo.run", *sys.argv[1:]]
block = __import__("os").environ.get("BLOCK_MODULE")
if block:
    sys.modules[block] = None  # as if the package were not installed
try:
    runpy.run_module("sdpo.run", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exit:
    code = exit.code
if "ray" in sys.modules:
    print("RAY WAS IMPORTED", file=sys.stderr)
sys.exit(code)
"""

USER_ENV = '''
import json
from environments import Environment, Task, Verdict


class QA(Environment):
    """Reads {"question", "answer"} rows from a JSONL file."""

    def __init__(self, path: str):
        with open(path) as f:
            self.rows = [json.loads(line) for line in f]

    def tasks(self, split):
        return [Task(id=str(i), messages=[{"role": "user", "content": r["question"]}], data={"answer": r["answer"]})
                for i, r in enumerate(self.rows)]

    def verify(self, task, completion):
        return Verdict(reward=float(completion.strip() == task.data["answer"]))


class RawRows(QA):
    """Hands dataset rows to the chat template as they are: wrong when the rows say "text", not "content"."""

    def tasks(self, split):
        return [Task(id=str(i), messages=[{"role": "user", "text": r["question"]}]) for i, r in enumerate(self.rows)]
'''


@pytest.fixture()
def user_env(tmp_path):
    (tmp_path / "qa_env.py").write_text(USER_ENV)
    (tmp_path / "good.jsonl").write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"}\n')
    (tmp_path / "no_answer.jsonl").write_text('{"question": "1+1", "solution": "2"}\n')
    return tmp_path


def run_cli(*args: str, cwd: Path = ROOT, pythonpath: Path | None = None, block: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (pythonpath, ROOT) if p)
    if block:
        env["BLOCK_MODULE"] = block
    return subprocess.run([sys.executable, "-c", RUN_AS_MAIN, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_rejected(out: subprocess.CompletedProcess, *expected: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert out.stderr.startswith("error: "), out.stderr
    for text in expected:
        assert text in out.stderr, (text, out.stderr)
    assert "RAY WAS IMPORTED" not in out.stderr
    assert "Traceback" not in out.stderr


# --- the recipe ---------------------------------------------------------------------------------

def test_missing_recipe():
    assert_rejected(run_cli("recipes/quickstrat.yaml"), "recipe 'recipes/quickstrat.yaml' does not exist")


def test_typo_in_a_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 5\nrollout:\n  sample_per_prompt: 8\n")
    assert_rejected(run_cli(str(recipe)), "rollout.sample_per_prompt: unknown key; valid keys here:",
                    "did you mean rollout.samples_per_prompt?")


def test_typo_in_a_section_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optimiser:\n  lr: 1.0e-5\n")
    assert_rejected(run_cli(str(recipe)), "optimiser: unknown key", "did you mean optimizer?")


def test_recipe_that_is_not_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [1, 2\n")
    assert_rejected(run_cli(str(recipe)), f"recipe {str(recipe)!r} is not valid YAML")


@pytest.mark.parametrize("override, expected", [
    ("loss.alpah=1", "loss.alpah: unknown key"),
    ("loss.alpha=1.5", "loss.alpha: Input should be less than or equal to 1"),
    ("rollout.top_p=0", "rollout.top_p: Input should be greater than 0"),
    ("steps=-1", "steps: Input should be greater than or equal to 0"),
    ("steps=many", "steps: Input should be a valid integer"),
    ("learner.world_size=3", "must be divisible by learner.world_size = 3"),
    ("rollout.engine=tgi", "rollout.engine: Input should be 'auto', 'vllm' or 'hf'"),
    ("steps", "override 'steps' must look like dotted.key=value"),
    ("environment.kwargs={feedback: true", "the value is not valid YAML"),
])
def test_bad_values_on_the_command_line(override, expected):
    assert_rejected(run_cli(QUICKSTART, override), expected)


# --- the model ----------------------------------------------------------------------------------

def test_missing_model_directory(tmp_path):
    missing = tmp_path / "qwen-finetuned"
    assert_rejected(run_cli(QUICKSTART, f"model.path={missing}"), f"model.path={str(missing)!r}: no such directory")


def test_missing_relative_model_directory():
    # "org/name" could be a hub name, but "sdpo/" is a local folder here: the user meant a path.
    assert_rejected(run_cli(QUICKSTART, "model.path=sdpo/my-model"), "no such directory (sdpo/ exists")


def test_model_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert_rejected(run_cli(QUICKSTART, f"model.path={tmp_path}"), "is not a Hugging Face model folder",
                    "no weights (*.safetensors or pytorch_model*.bin), no tokenizer (tokenizer.json")


def test_misspelt_embedded_model():
    assert_rejected(run_cli(QUICKSTART, "model.path=tiny-arithmatic"), "did you mean 'tiny-arithmetic'?")


def test_hub_model_when_offline_and_not_cached(tmp_path):
    env_out = subprocess.run(
        [sys.executable, "-c", RUN_AS_MAIN, QUICKSTART, "model.path=no-such-org/no-such-model"], cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "HF_HUB_OFFLINE": "1",
             "HF_HUB_CACHE": str(tmp_path)},
        capture_output=True, text=True, timeout=120)
    assert_rejected(env_out, "HF_HUB_OFFLINE is set while the hub cache holds no copy")


# --- the environment and its dataset ------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("no_such_pkg.envs:MyEnv", "environment.name='no_such_pkg.envs:MyEnv': cannot import 'no_such_pkg.envs'"),
    ("environments.arithmetic:Arithmetik", "module 'environments.arithmetic' has no 'Arithmetik'"),
    ("environments.arithmetic.Arithmetic", "expected 'module.path:ClassName'"),
    ("environments.arithmetic:question", "has no method tasks()"),
])
def test_unknown_environment_class(name, expected):
    assert_rejected(run_cli(QUICKSTART, f"environment.name={name}"), expected)


def test_environment_kwargs_that_do_not_fit():
    assert_rejected(run_cli(QUICKSTART, "environment.kwargs={feedbak: true}"),
                    "environment.kwargs for 'environments.arithmetic:Arithmetic' do not fit Arithmetic",
                    "feedbak")


def test_unknown_split():
    assert_rejected(run_cli(QUICKSTART, "environment.eval_split=validation"),
                    "environment.eval_split='validation'", "arithmetic has splits 'train' and 'test'")


def test_dataset_file_missing(user_env):
    missing = user_env / "data.jsonl"
    assert_rejected(run_cli(QUICKSTART, "environment.name=qa_env:QA", f"environment.kwargs={{path: {missing}}}",
                            pythonpath=user_env),
                    "environment.name='qa_env:QA'", "building it raised FileNotFoundError", str(missing))


def test_dataset_without_the_fields_the_environment_reads(user_env):
    out = run_cli(QUICKSTART, "environment.name=qa_env:QA", f"environment.kwargs={{path: {user_env / 'no_answer.jsonl'}}}",
                  pythonpath=user_env)
    assert_rejected(out, "qa_env:QA tasks('train')", "raised KeyError: 'answer'",
                    "that the dataset has the fields this environment reads")


def test_dataset_with_no_rows(user_env):
    (user_env / "empty.jsonl").write_text("")
    out = run_cli(QUICKSTART, "environment.name=qa_env:QA", f"environment.kwargs={{path: {user_env / 'empty.jsonl'}}}",
                  pythonpath=user_env)
    assert_rejected(out, "qa_env:QA tasks('train')", "returned no tasks: check the split name and the dataset")


def test_tasks_whose_messages_the_chat_template_cannot_read(user_env):
    out = run_cli(QUICKSTART, "environment.name=qa_env:RawRows", f"environment.kwargs={{path: {user_env / 'good.jsonl'}}}",
                  pythonpath=user_env)
    assert_rejected(out, "task '0' (#0) has a bad messages[0] (got ['role', 'text'])", "'content' (a string)")


def test_checks_pass_on_good_input(user_env):
    # The same checks let through what is right: the quickstart, and the user environment on a good dataset.
    preflight(load_config(ROOT / QUICKSTART))
    sys.path.insert(0, str(user_env))
    try:
        preflight(load_config(ROOT / QUICKSTART, ["environment.name=qa_env:QA",
                                                  f"environment.kwargs={{path: {user_env / 'good.jsonl'}}}"]))
    finally:
        sys.path.remove(str(user_env))
        sys.modules.pop("qa_env", None)


# --- the machine --------------------------------------------------------------------------------

def test_more_cpus_than_the_machine_has():
    assert_rejected(run_cli(QUICKSTART, "learner.num_cpus_per_rank=512"), "the actors ask for",
                    "learner.num_cpus_per_rank")


def test_gpus_that_are_not_there():
    out = run_cli(QUICKSTART, "device=cuda", "learner.num_gpus_per_rank=1", "rollout.num_gpus_per_replica=1")
    import torch

    if torch.cuda.device_count() >= 3:
        pytest.skip("this machine has the GPUs the recipe asks for")
    # 1 rollout replica + 1 learner rank (sdpo/sizing.py: one rank for a 0.6M model on a GPU)
    assert_rejected(out, "device=cuda: the actors ask for 2 GPUs but torch sees")


def test_run_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_rejected(run_cli(QUICKSTART, f"logging.run_dir={blocker}/run"), f"{blocker} is a file")


def test_run_dir_with_an_unknown_placeholder():
    assert_rejected(run_cli(QUICKSTART, "logging.run_dir=runs/{nmae}-{time}"),
                    "only the placeholders {name} and {time} are filled in")


def test_tensorboard_asked_for_but_not_installed():
    assert_rejected(run_cli(QUICKSTART, "logging.tensorboard=true", block="tensorboard"),
                    "logging.tensorboard=true needs the tensorboard package: `pip install tensorboard`")


def test_missing_teacher_checkpoint_names_teacher_path(tmp_path):
    missing = tmp_path / "no-teacher"
    assert_rejected(run_cli(QUICKSTART, "teacher.kind=checkpoint", f"teacher.path={missing}"),
                    f"teacher.path={str(missing)!r}: no such directory")
