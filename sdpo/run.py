"""`python -m sdpo.run RECIPE.yaml [dotted.key=value ...] [--dry-run]`

Everything a user can get wrong that can be seen without Ray is checked here first, so a bad recipe,
model path or environment fails in seconds with exit code 2 and a message naming what to fix,
instead of minutes later inside an actor (the table is in docs/bad_input.md)."""

from __future__ import annotations

import argparse
import importlib.util
import netrc
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from sdpo.cluster import check_fits_locally, describe_placement, placement
from sdpo.config import Config, EnvironmentConfig
from sdpo.placement import check_placement, model_max_positions
from sdpo.placement import describe as describe_engines
from sdpo.recipe import RecipeError, load_config, to_yaml
from sdpo.sizing import fit_to_model

CHAT_ROLES = {"system", "user", "assistant", "tool"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one "error: ..." line and exit code 2, like every other mistake
        hint = ""
        if "unrecognized arguments: --" in message:
            hint = "; settings are written without dashes, e.g. steps=5 loss.alpha=1.0 (the only flag is --dry-run)"
        print(f"error: {message}{hint} (usage: python -m sdpo.run RECIPE.yaml [dotted.key=value ...] [--dry-run])",
              file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m sdpo.run", description="Train a language model with SDPO.")
    parser.add_argument("args", nargs="*", metavar="RECIPE.yaml [dotted.key=value ...]",
                        help="a YAML recipe, e.g. recipes/quickstart.yaml, then overrides, e.g. steps=50 loss.alpha=1.0")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and actor placement, then exit")
    args = parser.parse_intermixed_args(argv)  # flags and overrides in any order
    try:
        recipe, overrides = split_recipe(args.args)
        cfg, sized = fit_to_model(load_config(recipe, overrides))  # unset sizes chosen for the model
        check_fits_locally(cfg)
        check_placement(cfg)  # GPU layouts that cannot work; derived engine settings that cannot hold
        engines = describe_engines(cfg, model_max_positions(cfg.model.path))
        if not args.dry_run:  # a dry run stays offline-safe: it may describe a cluster recipe on a laptop
            environment = preflight(cfg)
    except (RecipeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg))
        print(describe_placement(cfg))
        print(engines)
        print("".join(f"chosen: {reason}\n" for reason in sized), end="")
        return 0
    for reason in sized:
        print(f"[sdpo] chosen: {reason}", flush=True)
    from sdpo.checkpoint import CheckpointError
    from sdpo.env_pool import VerifierFailing
    from sdpo.trainer import Interrupted, train

    try:
        train(cfg, environment)  # the environment and tasks the checks already read
    except (CheckpointError, VerifierFailing) as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the trainer has cleaned up; one line, no traceback
        hint = err.resume_hint(recipe, overrides) if isinstance(err, Interrupted) else "interrupted"
        print(f"\n{hint}", file=sys.stderr)
        return 128 + getattr(err, "signum", 2)
    return 0


def split_recipe(args: list[str]) -> tuple[str, list[str]]:
    """The recipe is the argument that names a file (or a .yaml path, or else the first one that is
    not ``key=value``), wherever it is; the rest are overrides."""
    files = [a for a in args if Path(a).is_file() or ("=" not in a and a.endswith((".yaml", ".yml")))]
    if len(files) > 1:
        raise RecipeError(f"give one recipe file, then dotted.key=value overrides (got {len(files)}: "
                          f"{', '.join(map(repr, files))})")
    recipe = files[0] if files else next((a for a in args if "=" not in a), None)
    if recipe is None:
        raise RecipeError("give one recipe file, then dotted.key=value overrides, e.g. python -m sdpo.run "
                          "recipes/quickstart.yaml steps=50 (got none)")
    rest = list(args)
    rest.remove(recipe)
    return recipe, rest


def preflight(cfg: Config) -> tuple:
    """The checks that need the machine (files, packages, devices, the model's config, the data) but
    not Ray. Returns the environment and its tasks by split, built and read here, for the trainer to
    use. Warnings are printed only when every check passed, so an error stays the only line."""
    from sdpo.metrics import require_tensorboard
    from sdpo.models import check_model_path

    warnings: list[str] = []
    check_gpus_locally(cfg)
    check_model_path(cfg.model.path)
    if cfg.teacher.path is not None:
        check_model_path(cfg.teacher.path, key="teacher.path")
    check_run_dir(cfg.logging.run_dir, cfg.name)
    if cfg.logging.tensorboard:
        require_tensorboard()
    check_ray_address(cfg)
    warnings += check_wandb(cfg)
    environment = check_environment(cfg.environment)
    from sdpo.checks import check_model, check_prompt_lengths, check_resume, check_teacher_signal

    facts = check_model(cfg)
    warnings += check_prompt_lengths(cfg, environment[1], facts)
    warnings += check_teacher_signal(cfg, *environment)
    warnings += check_resume(cfg, environment[1])
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    return environment


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
    # os.access says yes to /proc and /sys as root, and to read-only mounts: make (and remove) a directory.
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".sdpo-probe-").cleanup()
    except OSError as err:
        raise ValueError(f"logging.run_dir={template!r}: a directory cannot be made in {existing} "
                         f"({err.strerror or err}); give a path on a writable disk") from None


RAY_CONNECT_TIMEOUT_S = 5.0


def check_ray_address(cfg: Config) -> None:
    """A cluster address that does not answer makes ray.init wait for minutes: try it for a few seconds."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    key = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
    host_port = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{key}={address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    if address.startswith("ray://"):  # Ray Client: a TCP answer is all that can be asked without Ray
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
        except OSError as err:
            raise ValueError(f"{key}={address!r}: nothing answers at {host}:{port} within {RAY_CONNECT_TIMEOUT_S:g} s "
                             f"({err.strerror or err}); start the Ray Client server on the head node, fix the address, "
                             "or unset it to start a local cluster") from None
        return
    problem = gcs_problem(f"{host}:{port}", RAY_CONNECT_TIMEOUT_S)
    if problem:
        raise ValueError(f"{key}={address!r}: {problem}; start the head node (ray start --head), fix the address, "
                         "or unset it to start a local cluster")


def gcs_problem(address: str, timeout_s: float) -> str | None:
    """Whether a Ray head (its GCS, a gRPC server) answers at ``address``: one call to a GCS method,
    without importing Ray. A TCP port that accepts is not enough (a proxy or another server would)."""
    import grpc

    channel = grpc.insecure_channel(address)
    try:
        # ray/src/ray/protobuf/gcs_service.proto: NodeInfoGcsService.GetClusterId; an empty request is valid.
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                   request_serializer=lambda _: b"", response_deserializer=lambda raw: raw)
        call(None, timeout=timeout_s)
        return None
    except grpc.RpcError as err:
        code = err.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return None  # a head with token auth: it is there
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return f"no Ray head answers at {address} within {timeout_s:g} s ({err.details() or code.name})"
        return f"something answers at {address}, but not a Ray head's GCS ({code.name}: {err.details()})"
    finally:
        channel.close()


def check_wandb(cfg: Config) -> list[str]:
    """wandb online needs the package, an API key and the network; without the last two it would
    fail (or wait) minutes in, so log offline instead and say so."""
    if not cfg.logging.wandb:
        return []
    if importlib.util.find_spec("wandb") is None:
        raise ValueError("logging.wandb=true needs the wandb package: `pip install wandb` (or set logging.wandb=false)")
    if cfg.logging.wandb_mode != "online" or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return []
    host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://", 1)[-1].split("/", 1)[0]
    problem = None
    if not os.environ.get("WANDB_API_KEY"):
        try:
            # `wandb login` writes the key to ~/.netrc, or to $NETRC when that is set (as wandb reads it).
            has_key = netrc.netrc(os.environ.get("NETRC")).authenticators(host.split(":")[0]) is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
        if not has_key:
            problem = "no API key (set WANDB_API_KEY or run `wandb login`)"
    if problem is None:
        name, _, port = host.partition(":")
        try:
            socket.create_connection((name, int(port or 443)), timeout=3.0).close()
        except OSError as err:
            problem = f"{host} cannot be reached ({err.strerror or err})"
    if problem is None:
        return []
    cfg.logging.wandb_mode = "offline"
    return [f"logging.wandb_mode=online but {problem}: logging to wandb offline instead, in RUN_DIR/wandb "
            "(upload it later with `wandb sync`)"]


def check_environment(env_cfg: EnvironmentConfig) -> tuple:
    """Builds the environment and reads both splits, so a missing dataset or a task without the
    fields the chat template needs fails now, not in the first step. Returns (environment, tasks by split)."""
    from environments import Task, load_environment

    name, kwargs = env_cfg.name, env_cfg.kwargs
    try:
        env = load_environment(name, kwargs)
    except ValueError:
        raise  # load_environment's own messages name the key
    except (Exception, SystemExit) as err:  # the class's constructor: a missing file, a bad argument value
        raise ValueError(f"environment.name={name!r} with environment.kwargs={kwargs}: building it raised "
                         f"{type(err).__name__}: {err}") from None
    tasks_by_split = {}
    for key, split in (("environment.train_split", env_cfg.train_split), ("environment.eval_split", env_cfg.eval_split)):
        where = f"{name} tasks({split!r}) ({key}={split!r}, environment.kwargs={kwargs})"
        try:
            tasks = tasks_by_split[split] = list(env.tasks(split))
        except (Exception, SystemExit) as err:  # e.g. KeyError: a dataset row without the field the environment reads
            raise ValueError(f"{where} raised {type(err).__name__}: {err}. Check the split name, environment.kwargs, "
                             "and that the dataset has the fields this environment reads") from None
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
    if not any(m["role"] == "user" for m in task.messages):  # the teacher's reprompt rewrites the last user message
        return "has no 'user' message: the prompt must ask something (the teacher's context rewrites the last user message)"
    if not isinstance(task.data, dict):
        return f"has data of type {type(task.data).__name__}: Task.data must be a dict"
    return None


if __name__ == "__main__":
    sys.exit(main())
