"""What a user can get wrong, and the error each gets: `python -m sdpo.run` exits with code 2 and a
message naming the key and what to fix, before Ray is even imported (the table: docs/bad_input.md)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo.recipe import load_config
from sdpo.run import preflight

pytestmark = pytest.mark.slow  # most tests run the CLI in a subprocess

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


# --- the command line and YAML -----------------------------------------

def test_flags_and_overrides_in_any_order():
    out = run_cli(QUICKSTART, "--dry-run", "loss.alpha=1.0")
    assert out.returncode == 0, out.stderr
    assert "alpha: 1.0" in out.stdout
    before = run_cli("--dry-run", "steps=7", QUICKSTART)  # the recipe is the argument without "="
    assert before.returncode == 0 and "steps: 7" in before.stdout, before.stderr


def test_an_option_written_with_dashes():
    assert_rejected(run_cli(QUICKSTART, "--steps=5"), "unrecognized arguments: --steps=5",
                    "settings are written without dashes, e.g. steps=5")


def test_no_recipe_or_two_recipes():
    assert_rejected(run_cli("steps=5"), "give one recipe file", "got none")
    assert_rejected(run_cli(QUICKSTART, "recipes/math.yaml"), "give one recipe file", "got 2")


def test_a_directory_as_the_recipe():
    assert_rejected(run_cli("recipes"), "recipe 'recipes' is a directory; give a YAML file in it, e.g. recipes/")


def test_a_recipe_that_is_not_utf8(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"name: caf\xe9\nsteps: 5\n")  # Latin-1
    assert_rejected(run_cli(str(recipe)), "is not UTF-8 text: byte 0xe9 at offset 9 (line 1)")


def test_a_key_given_twice(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 5\nrollout:\n  samples_per_prompt: 4\n  samples_per_prompt: 8\n")
    assert_rejected(run_cli(str(recipe)), "the key 'samples_per_prompt' is given twice in one mapping, on line 3 and on line 4")
    recipe.write_text("rollout:\n  samples_per_prompt: 4\nsteps: 5\nrollout:\n  replicas: 1\n")
    assert_rejected(run_cli(str(recipe)), "the key 'rollout' is given twice in one mapping, on line 1 and on line 4")


def test_yes_no_on_off_are_read_as_written(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 010\nlearner:\n  mixed_precision: no\nlogging:\n  wandb: yes\n  tensorboard: off\n"
                      "optimizer:\n  lr: 1e-4\n")
    cfg = load_config(recipe)
    assert cfg.learner.mixed_precision == "no" and cfg.logging.wandb is True and cfg.logging.tensorboard is False
    assert cfg.seed == 10 and cfg.optimizer.lr == 1e-4  # YAML 1.2: no octal, 1e-4 is a number
    assert load_config(ROOT / QUICKSTART, ["learner.mixed_precision=no"]).learner.mixed_precision == "no"


@pytest.mark.parametrize("recipe, expected", [
    ("teacher_context:\n  reprompt_template: '{promt}{solution}{feedback}'\n",
     "teacher_context.reprompt_template: unknown placeholder {promt} (did you mean {prompt}?)"),
    ("teacher_context:\n  feedback_template: 'Feedback: {feedback_raw'\n", "teacher_context.feedback_template: "),
    ("optimizer:\n  betas: [0.9, 1.5]\n", "optimizer.betas[1] must be in [0, 1), got 1.5"),
    ("rollout:\n  samples_per_prompt: 1\nteacher_context:\n  include_environment_feedback: false\n",
     "rollout.samples_per_prompt=1 with loss.objective=sdpo"),
])
def test_settings_that_would_fail_inside_the_run(tmp_path, recipe, expected):
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    assert_rejected(run_cli(str(path), "--dry-run"), expected)


# --- second round: the machine, the model, the data ---------------------------------------------

def test_run_dir_under_proc():
    assert_rejected(run_cli(QUICKSTART, "logging.run_dir=/proc/sdpo-run"),
                    "logging.run_dir='/proc/sdpo-run': a directory cannot be made in /proc")


def test_a_ray_address_that_does_not_answer():
    assert_rejected(run_cli(QUICKSTART, "ray.address=127.0.0.1:1"),
                    "ray.address='127.0.0.1:1': no Ray head answers at 127.0.0.1:1 within 5 s")


def test_an_environment_module_that_exits_at_import(tmp_path):
    (tmp_path / "exits.py").write_text("import sys\nsys.exit('no data here')\n")
    assert_rejected(run_cli(QUICKSTART, "environment.name=exits:Env", pythonpath=tmp_path),
                    "importing 'exits' called sys.exit('no data here')")


def test_topk_larger_than_the_vocabulary():
    assert_rejected(run_cli(QUICKSTART, "loss.topk=1000"),
                    "loss.topk=1000 is larger than the vocabulary of model.path='tiny-arithmetic' (260 tokens)")


@pytest.fixture()
def tiny_copy(tmp_path):
    """A model folder to edit the config of: the embedded model's files."""
    import shutil

    from sdpo.models import resolve_model_path

    folder = tmp_path / "model"
    shutil.copytree(resolve_model_path("tiny-arithmetic"), folder)
    return folder


def _with_config(folder: Path, **changes) -> Path:
    import json

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_a_head_size_vllm_cpu_cannot_run(tiny_copy):
    folder = _with_config(tiny_copy, head_dim=20)
    out = run_cli(QUICKSTART, f"model.path={folder}", "rollout.engine=vllm")
    assert_rejected(out, "has head_dim 20, which vLLM-CPU's attention cannot run", "set rollout.engine=hf")


def test_a_prompt_longer_than_the_models_context(user_env):
    (user_env / "long.jsonl").write_text('{"question": "1+1", "answer": "2"}\n' + '{"question": "%s", "answer": "2"}\n' % ("9 " * 3000))
    out = run_cli(QUICKSTART, "environment.name=qa_env:QA", f"environment.kwargs={{path: {user_env / 'long.jsonl'}}}",
                  pythonpath=user_env)
    assert_rejected(out, "task '1' (#1) of environment.train_split='train' has a prompt of",
                    "leaves only 1024 for a prompt: raise rollout.max_prompt_tokens")


def test_a_teacher_prompt_budget_past_the_models_positions():
    assert_rejected(run_cli(QUICKSTART, "teacher_context.max_teacher_prompt_tokens=4096"),
                    "teacher_context.max_teacher_prompt_tokens=4096 is not below the 2048 positions")


def test_one_sample_per_prompt_without_any_teacher_signal():
    assert_rejected(run_cli(QUICKSTART, "rollout.samples_per_prompt=1", "loss.objective=sdpo"),
                    "rollout.samples_per_prompt=1 with loss.objective=sdpo",
                    "gave no feedback for a wrong answer")


def test_one_sample_per_prompt_with_feedback_is_a_warning(capsys):
    cfg = load_config(ROOT / QUICKSTART, ["rollout.samples_per_prompt=1", "loss.objective=sdpo",
                                          "environment.kwargs={feedback: true}"])
    preflight(cfg)
    assert "warning: rollout.samples_per_prompt=1 with loss.objective=sdpo: the teacher learns only from environment feedback" \
        in capsys.readouterr().err


def test_wandb_online_without_a_key_logs_offline(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))  # where `wandb login` would have put the key
    cfg = load_config(ROOT / QUICKSTART, ["logging.wandb=true", "logging.wandb_mode=online"])
    preflight(cfg)
    assert cfg.logging.wandb_mode == "offline"
    assert "logging.wandb_mode=online but no API key" in capsys.readouterr().err


@pytest.mark.integration
def test_the_head_sizes_are_vllms():
    cpu_attn = pytest.importorskip("vllm.v1.attention.backends.cpu_attn")
    from sdpo.checks import VLLM_CPU_HEAD_SIZES

    assert list(VLLM_CPU_HEAD_SIZES) == cpu_attn.CPUAttentionBackend.get_supported_head_sizes()


# --- second round: a verifier that fails is never feedback, and a failing run stops ---------------

def test_a_verdict_is_checked_where_it_is_made():
    from environments import Verdict

    assert Verdict(reward=1).reward == 1.0 and isinstance(Verdict(reward=True).reward, float)
    for bad, message in [({"reward": float("nan")}, "finite number in [0, 1], got nan"),
                         ({"reward": 1.5}, "got 1.5"), ({"reward": -0.1}, "got -0.1"),
                         ({"reward": "1"}, "must be a number in [0, 1], got str"),
                         ({"reward": None}, "got NoneType"),
                         ({"reward": 0.0, "feedback": 3}, "feedback must be a string or None, got int"),
                         ({"reward": 0.0, "info": []}, "info must be a dict"),
                         ({"reward": 0.0, "info": {"metrics": [0.5]}}, "info['metrics'] must be a dict"),
                         ({"reward": 0.0, "info": {"metrics": {"acc": float("inf")}}}, "'acc': inf"),
                         ({"reward": 0.0, "info": {"metrics": {"acc": "0.5"}}}, "'acc': '0.5'")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            Verdict(**bad)


def test_verifier_failures_score_zero_with_no_feedback_without_ray(tmp_path):
    """The worker's own logic, called in this process: raises, None, float, NaN, non-string feedback."""
    from environments import Task
    from sdpo.env_pool import EnvWorker

    (tmp_path / "bad_verifiers.py").write_text(
        "import math\nfrom environments import Environment, Task, Verdict\n"
        "class Bad(Environment):\n"
        "    def tasks(self, split):\n        return []\n"
        "    def verify(self, task, completion):\n"
        "        if completion == 'raise': raise KeyError('answer')\n"
        "        if completion == 'none': return None\n"
        "        if completion == 'float': return 1.0\n"
        "        if completion == 'nan': return Verdict(math.nan)\n"
        "        return Verdict(1.0, 'fine')\n")
    worker = EnvWorker(f"{tmp_path / 'bad_verifiers.py'}:Bad", {})
    tasks = [Task(id=str(i), messages=[{"role": "user", "content": "q"}]) for i in range(5)]
    verdicts = worker.verify(tasks, ["raise", "none", "float", "nan", "ok"], timeout_s=5)
    assert [v.reward for v in verdicts] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert [v.feedback for v in verdicts] == [None, None, None, None, "fine"]
    assert [v.info.get("verifier_failure") for v in verdicts] == ["error", "invalid", "invalid", "error", None]
    assert "verify() returned NoneType" in verdicts[1].info["verifier_error"]
    assert "verify() returned float" in verdicts[2].info["verifier_error"]


def test_a_failed_verdict_gives_no_teacher_signal():
    from environments import Task, Verdict
    from sdpo.batch import build_batch
    from sdpo.config import TeacherContextConfig
    from sdpo.env_pool import failed
    from sdpo.rollout.base import Completion
    from sdpo.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer()
    task = Task(id="0", messages=[{"role": "user", "content": "12+3"}])
    group = [Completion(token_ids=tok.encode(t), logprobs=[-1.0] * 2, finish_reason="length") for t in ("15", "14", "13")]
    verdicts = [failed("verify() raised KeyError: 'answer'", "error"), Verdict(0.0, "too low"), Verdict(1.0)]
    samples, stats = build_batch([task], [tok.encode("P")], [group], [verdicts], tok, TeacherContextConfig(),
                                 max_positions=2048)
    # The unjudged sample gets neither the successful sibling "13" nor its own error text.
    assert samples[0].sd_mask == 0 and samples[0].teacher_prompt_ids == samples[0].prompt_ids
    assert samples[0].advantage == 0.0  # and no policy gradient
    text = tok.decode(samples[1].teacher_prompt_ids)
    assert samples[1].sd_mask == 1 and "Correct solution:\n\n13" in text and "KeyError" not in text
    assert stats["teacher/no_verdict_frac"] == 1 / 3


def test_a_teacher_prompt_never_runs_past_the_models_positions():
    from environments import Task, Verdict
    from sdpo.batch import build_batch
    from sdpo.config import TeacherContextConfig
    from sdpo.rollout.base import Completion
    from sdpo.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer()
    task = Task(id="long", messages=[{"role": "user", "content": "1+1 " * 20}])
    prompt = tok.encode("1+1 " * 20)
    group = [Completion(token_ids=tok.encode(t), logprobs=[-1.0] * len(t), finish_reason="length") for t in ("2", "3")]
    positions = len(prompt) + 4
    samples, _ = build_batch([task], [prompt], [group], [[Verdict(1.0), Verdict(0.0)]], tok, TeacherContextConfig(),
                             max_positions=positions)
    assert samples[1].sd_mask == 1
    assert len(samples[1].teacher_prompt_ids) + len(samples[1].response_ids) == positions  # cut to fit, not past
    with pytest.raises(ValueError, match="task 'long': its prompt .* longer than the model's 10 positions"):
        build_batch([task], [prompt], [group], [[Verdict(1.0), Verdict(0.0)]], tok, TeacherContextConfig(), max_positions=10)


def test_the_run_stops_when_the_verifier_keeps_failing():
    from environments import Verdict
    from sdpo.config import EnvironmentConfig
    from sdpo.env_pool import FailureWatch, VerifierFailing, failed

    bad, good = failed("verify() raised KeyError: 'answer'", "error"), Verdict(1.0)
    watch = FailureWatch(EnvironmentConfig())
    watch.record([bad, bad, good, good])  # some failures: counted and printed, the run goes on
    with pytest.raises(VerifierFailing, match=r"failed on all 8 calls of one round \(error: 8\); the first: verify\(\) raised KeyError"):
        watch.record([bad] * 8)
    # Most of the calls over the window (5 rounds) fail, though never all of one round:
    watch = FailureWatch(EnvironmentConfig())
    for _ in range(4):
        watch.record([bad] * 3 + [good])
    with pytest.raises(VerifierFailing, match=r"failed on 15 of the 20 calls of the last 5 rounds \(more than 0.5\)"):
        watch.record([bad] * 3 + [good])
    never = FailureWatch(EnvironmentConfig(max_verifier_failure_frac=1.0))
    for _ in range(10):
        never.record([bad] * 8)
    assert never.failures == {"error": 80}


# --- second round: resume ------------------------------------------------------------------------

def fake_checkpoint(run_dir: Path, step: int, overrides: list[str] = (), num_tasks: int | None = None) -> Path:
    """A checkpoint directory as Checkpoints.save lays it out (the shard bytes are not real weights:
    these tests read only what a resume checks before it loads anything)."""
    import torch

    from environments import load_environment
    from sdpo.checkpoint import write_manifest
    from sdpo.recipe import to_yaml

    cfg = load_config(ROOT / QUICKSTART, [*overrides, f"logging.run_dir={run_dir}"])
    if num_tasks is None:
        num_tasks = len(load_environment(cfg.environment.name, cfg.environment.kwargs).tasks(cfg.environment.train_split))
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    (path / "learner").mkdir(parents=True)
    (path / "learner" / ".metadata").write_bytes(b"m" * 100)
    (path / "learner" / "__0_0.distcp").write_bytes(b"w" * 5000)
    for rank in range(cfg.learner.world_size):
        torch.save({"rank": rank}, path / f"rank{rank}.pt")
    torch.save({"step": step, "sampler": {"num_tasks": num_tasks}, "before": {}}, path / "driver.pt")
    (path / "config.yaml").write_text(to_yaml(cfg))
    write_manifest(path)
    (path / "COMPLETE").write_text(f"step {step}\n")
    return path


def test_a_damaged_checkpoint_is_skipped_for_the_newest_that_verifies(tmp_path, capsys):
    from sdpo.checkpoint import Checkpoints

    older, newer = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    checkpoints = Checkpoints(load_config(ROOT / QUICKSTART), tmp_path)
    assert checkpoints.latest() == newer
    with open(newer / "learner" / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)  # a shard cut short, though COMPLETE is there
    assert checkpoints.latest() == older
    assert checkpoints.skipped == [(newer, "learner/__0_0.distcp has 1000 bytes, 5000 were written")]
    assert f"checkpoint {newer} is damaged and skipped: learner/__0_0.distcp has 1000 bytes" in capsys.readouterr().err
    (older / "driver.pt").write_bytes(b"x" * (older / "driver.pt").stat().st_size)  # same size, other bytes
    assert checkpoints.latest() is None
    assert "driver.pt does not match the checksum recorded when it was written" in checkpoints.skipped[1][1]
    (newer / "learner" / "__0_0.distcp").unlink()
    assert "learner/__0_0.distcp is missing" in checkpoints.skipped[0][1] or checkpoints.latest() is None


def test_resume_with_another_world_size_or_model(tmp_path, tiny_copy):
    run_dir = tmp_path / "run"
    fake_checkpoint(run_dir, 2, ["learner.world_size=1"])
    out = run_cli(QUICKSTART, f"logging.run_dir={run_dir}")
    assert_rejected(out, f"logging.run_dir='{run_dir}' holds {run_dir}/checkpoints/step_000002, which this config cannot "
                         "resume: learner.world_size 1 -> 2", "checkpoint.resume=never")
    out = run_cli(QUICKSTART, f"logging.run_dir={run_dir}", "learner.world_size=1", f"model.path={tiny_copy}")
    assert_rejected(out, f"model.path 'tiny-arithmetic' -> '{tiny_copy}'")
    # The same config resumes (preflight passes), and checkpoint.resume=never starts over.
    preflight(load_config(ROOT / QUICKSTART, [f"logging.run_dir={run_dir}", "learner.world_size=1"]))
    preflight(load_config(ROOT / QUICKSTART, [f"logging.run_dir={run_dir}", "checkpoint.resume=never"]))


def test_resume_with_other_data(tmp_path):
    run_dir = tmp_path / "run"
    fake_checkpoint(run_dir, 2, num_tasks=7)
    assert_rejected(run_cli(QUICKSTART, f"logging.run_dir={run_dir}"), "which this config cannot resume: training tasks 7 -> ")


# --- further bad inputs a new user makes (docs/bad_input.md, "further") ---------------------------

@pytest.mark.parametrize("override, expected", [
    ("logging.run_dir=", "logging.run_dir: String should have at least 1 character"),
    ("model.path=", "model.path: String should have at least 1 character"),
    ("optimizer.betas=[0.9]", "optimizer.betas must be two numbers, e.g. [0.9, 0.999], got [0.9]"),
    ("teacher_context.success_threshold=2", "teacher_context.success_threshold: Input should be less than or equal to 1"),
    ("teacher_context.reprompt_template='{solution}{feedback}'", "teacher_context.reprompt_template has no {prompt}"),
    ("rollout.max_response_tokens=100000", None),  # needs the model: checked by a real run's preflight
])
def test_further_settings(override, expected):
    if expected is None:
        assert_rejected(run_cli(QUICKSTART, override), "rollout.max_prompt_tokens + rollout.max_response_tokens = 101024 exceeds "
                        "the model's max_position_embeddings=2048")
    else:
        assert_rejected(run_cli(QUICKSTART, override, "--dry-run"), expected)


def test_a_task_without_a_user_message(tmp_path):
    (tmp_path / "sys_env.py").write_text(
        "from environments import Environment, Task, Verdict\nclass S(Environment):\n"
        "    def tasks(self, split):\n        return [Task(id='a', messages=[{'role': 'system', 'content': 'be brief'}])]\n"
        "    def verify(self, task, completion):\n        return Verdict(0.0)\n")
    assert_rejected(run_cli(QUICKSTART, "environment.name=sys_env:S", pythonpath=tmp_path),
                    "task 'a' (#0) has no 'user' message")


def test_a_home_relative_run_dir_is_expanded():
    assert load_config(ROOT / QUICKSTART, ["logging.run_dir=~/runs/{name}"]).logging.run_dir == os.path.expanduser("~/runs/{name}")
