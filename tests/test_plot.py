"""Logs and pictures: `python -m sdpo.plot RUN_DIR` makes real PNGs from a metrics.jsonl shaped like
the trainer's and fails clearly on a directory that is not a run; TensorBoard gets every metric."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo.metrics import RunLogger
from sdpo.plot import load_metrics, moving_average, series
from sdpo.recipe import load_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir: Path, steps: int = 30, eval_every: int = 10) -> None:
    """Rows in the order the trainer writes them: eval at 0, a row per step, eval every N and at the end."""
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, "eval/success_t": 0.2, "eval/success_greedy": 0.5}]
    for s in range(1, steps + 1):
        rows.append({"step": s, "rollout/reward_mean": 0.2 + s / 100, "rollout/success_frac": 0.2 + s / 100,
                     "rollout/response_tokens_mean": 3.5, "teacher/signal_frac": 0.8, "learn/loss": 0.1 - s / 1000,
                     "time/generate_s": 0.1, "time/verify_s": 0.01, "time/teacher_contexts_s": 0.01,
                     "time/learn_s": 0.3, "time/weight_sync_s": 0.05, "time/step_s": 0.5})
        if s % eval_every == 0:
            rows.append({"step": s, "eval/success_t": 0.2 + s / 200, "eval/success_greedy": 0.5 + s / 200})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.yaml").write_text("eval:\n  temperature: 0.7\n  samples_per_task: 4\n")


def _plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdpo.plot", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_writes_a_png_per_quantity_and_an_overview(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    out = _plot(str(run))
    assert out.returncode == 0, out.stderr
    expected = ["reward", "eval_success", "loss", "response_length", "phase_time", "teacher_signal", "overview"]
    written = [Path(line) for line in out.stdout.split()]
    assert [p.stem for p in written] == expected
    for path in written:
        assert path.parent == run / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path  # a real image, not an empty canvas


def test_out_dir_and_a_run_without_eval_or_timings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "rollout/reward_mean": s / 10, "learn/loss": 1 / s}) + "\n" for s in range(1, 6)))
    out = _plot(str(run), "--out", str(tmp_path / "pics"))
    assert out.returncode == 0, out.stderr
    # Only the quantities the file has: no empty eval or timing plots.
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["loss.png", "overview.png", "reward.png"]


def test_errors_name_what_is_wrong(tmp_path):
    out = _plot(str(tmp_path))  # a directory, but not a run
    assert out.returncode == 2
    assert f"{tmp_path / 'metrics.jsonl'} not found" in out.stderr and "python -m sdpo.run" in out.stderr
    out = _plot(str(tmp_path / "missing"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    (tmp_path / "metrics.jsonl").write_text("")
    out = _plot(str(tmp_path))
    assert out.returncode == 2 and "has no rows yet" in out.stderr
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "foo": 2}\n')
    out = _plot(str(tmp_path))
    assert out.returncode == 2 and "none of the metrics" in out.stderr
    (tmp_path / "metrics.jsonl").write_text('{"step": 1\n{"step": 2, "learn/loss": 1.0}\n')
    out = _plot(str(tmp_path))
    assert out.returncode == 2 and "metrics.jsonl:1 is not JSON" in out.stderr


def test_partial_last_line_and_resumed_steps(tmp_path):
    # A killed run can end mid-line; a resumed one logs again the steps after its checkpoint.
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "learn/loss": 1.0}\n{"step": 2, "learn/loss": 9.0}\n{"step": 2, "learn/loss": 2.0}\n{"step": 3, "lea')
    rows = load_metrics(tmp_path)
    assert series(rows, "learn/loss") == ([1, 2], [1.0, 2.0])


def test_moving_average_is_trailing():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([4.0, 2.0], 1) == [4.0, 2.0]


def test_tensorboard_gets_every_metric(tmp_path):
    pytest.importorskip("tensorboard", reason="logging.tensorboard needs `pip install tensorboard`")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, ["logging.tensorboard=true", "steps=2"])
    log = RunLogger(cfg, tmp_path)
    log.log(0, {"eval/success_t": 0.25})
    log.log(1, {"rollout/reward_mean": 0.5, "rollout/success_frac": 0.5, "teacher/signal_frac": 0.8, "learn/loss": 0.1,
                "learn/grad_norm": 1.0, "learn/rollout_logp_gap_abs": 0.0, "throughput/tokens_per_s": 100.0})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"eval/success_t", "rollout/reward_mean", "learn/loss"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("learn/loss")] == [(1, pytest.approx(0.1))]
    assert [(e.step, e.value) for e in events.Scalars("eval/success_t")] == [(0, 0.25)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # the JSONL is written all the same
