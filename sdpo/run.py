"""`python -m sdpo.run RECIPE.yaml [dotted.key=value ...] [--dry-run]`

Everything a user can get wrong that can be seen without Ray is checked here first, so a bad recipe,
model path or environment fails in seconds with exit code 2 and a message naming what to fix,
instead of minutes later inside an actor (the table is in docs/bad_input.md)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sdpo.cluster import check_fits_locally, describe_placement, placement
from sdpo.config import Config, EnvironmentConfig
from sdpo.recipe import RecipeError, load_config, to_yaml
from sdpo.sizing import fit_to_model

CHAT_ROLES = {"system", "user", "assistant", "tool"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdpo.run", description="Train a language model with SDPO.")
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. steps=50 loss.alpha=1.0")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and actor placement, then exit")
    args = parser.parse_args(argv)
    try:
        cfg, sized = fit_to_model(load_config(args.recipe, args.overrides))  # unset sizes chosen for the model
        check_fits_locally(cfg)
        if not args.dry_run:  # a dry run stays offline-safe: it may describe a cluster recipe on a laptop
            environment = preflight(cfg)
    except (RecipeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg))
        print(describe_placement(cfg))
        print("".join(f"chosen: {reason}\n" for reason in sized), end="")
        return 0
    for reason in sized:
        print(f"[sdpo] chosen: {reason}", flush=True)
    from sdpo.checkpoint import CheckpointError
    from sdpo.trainer import train

    try:
        train(cfg, environment)  # the environment and tasks the checks already read
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


def preflight(cfg: Config) -> tuple:
    """The checks that need the machine (files, packages, devices) but not Ray. Returns the
    environment and its tasks by split, built and read here, for the trainer to use."""
    from sdpo.metrics import require_tensorboard
    from sdpo.models import check_model_path

    check_gpus_locally(cfg)
    check_model_path(cfg.model.path)
    if cfg.teacher.path is not None:
        check_model_path(cfg.teacher.path, key="teacher.path")
    check_run_dir(cfg.logging.run_dir, cfg.name)
    if cfg.logging.tensorboard:
        require_tensorboard()
    return check_environment(cfg.environment)


def check_gpus_locally(cfg: Config) -> None:
    if cfg.device != "cuda" or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return  # an attached cluster's GPUs are on other machines: Ray places the actors there
    import torch

    wanted = sum(p["count"] * p["num_gpus"] for p in placement(cfg))
    have = torch.cuda.device_count()
    if wanted > have + 1e-9:
        raise ValueError(f"device=cuda: the actors ask for {wanted:g} GPUs but torch sees {have} here; use device=cpu, "
                         "lower learner.num_gpus_per_rank / rollout.num_gpus_per_replica, or attach to a GPU cluster "
                         "(RAY_ADDRESS or ray.address)")


def check_run_dir(template: str, name: str) -> None:
    try:
        path = Path(template.format(name=name, time=time.strftime("%Y%m%d-%H%M%S")))
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"logging.run_dir={template!r}: only the placeholders {{name}} and {{time}} are filled "
                         f"in ({type(err).__name__}: {err})") from None
    existing = path
    while not existing.exists():  # the run creates the missing part; the part that exists must take it
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"logging.run_dir={template!r}: {existing} is a file, so {path} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"logging.run_dir={template!r}: {existing} is not writable")


def check_environment(env_cfg: EnvironmentConfig) -> tuple:
    """Builds the environment and reads both splits, so a missing dataset or a task without the
    fields the chat template needs fails now, not in the first step. Returns (environment, tasks by split)."""
    from environments import Task, load_environment

    name, kwargs = env_cfg.name, env_cfg.kwargs
    try:
        env = load_environment(name, kwargs)
    except ValueError:
        raise  # load_environment's own messages name the key
    except Exception as err:  # the class's constructor: a missing file, a bad argument value
        raise ValueError(f"environment.name={name!r} with environment.kwargs={kwargs}: building it raised "
                         f"{type(err).__name__}: {err}") from None
    tasks_by_split = {}
    for key, split in (("environment.train_split", env_cfg.train_split), ("environment.eval_split", env_cfg.eval_split)):
        where = f"{name} tasks({split!r}) ({key}={split!r}, environment.kwargs={kwargs})"
        try:
            tasks = tasks_by_split[split] = list(env.tasks(split))
        except Exception as err:  # e.g. KeyError: a dataset row without the field the environment reads
            raise ValueError(f"{where} raised {type(err).__name__}: {err}. Check the split name and that the "
                             "dataset has the fields this environment reads") from None
        if not tasks:
            raise ValueError(f"{where} returned no tasks: check the split name and the dataset")
        for index, task in enumerate(tasks):
            problem = task_problem(task, Task)
            if problem:
                label = f"task {getattr(task, 'id', index)!r} (#{index})"
                raise ValueError(f"{where}: {label} {problem}")
    return env, tasks_by_split


def task_problem(task, task_type: type) -> str | None:
    """What is wrong with one task, or None; the message says what a Task must hold."""
    if not isinstance(task, task_type):
        return f"is a {type(task).__name__}, not environments.Task(id, messages, data)"
    if not isinstance(task.messages, list) or not task.messages:
        return "has no messages: Task.messages must be a non-empty list of {'role': ..., 'content': ...}"
    for i, message in enumerate(task.messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or message.get("role") not in CHAT_ROLES:
            got = sorted(message) if isinstance(message, dict) else type(message).__name__
            return (f"has a bad messages[{i}] (got {got}): each message needs 'role' (one of {sorted(CHAT_ROLES)}) "
                    "and 'content' (a string)")
    if not isinstance(task.data, dict):
        return f"has data of type {type(task.data).__name__}: Task.data must be a dict"
    return None


if __name__ == "__main__":
    sys.exit(main())
