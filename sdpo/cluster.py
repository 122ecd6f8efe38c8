"""Attaching to Ray, deciding where actors go, and starting them."""

from __future__ import annotations

import os

from sdpo.config import Config

# Quiet, predictable actors: vLLM's own logging and Ray's dedup are noise at our scale.
ACTOR_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}


def placement(cfg: Config) -> list[dict]:
    """What each role asks Ray for. Phases run one after another, so fractional CPUs are a
    scheduling budget, not a thread count (threads are set per role)."""
    r, lrn, e = cfg.rollout, cfg.learner, cfg.environment
    return [
        {"role": "rollout", "count": r.replicas, "num_cpus": r.num_cpus_per_replica, "num_gpus": r.num_gpus_per_replica,
         "threads": r.torch_threads_per_replica, "engine": r.engine},
        {"role": "environment", "count": e.workers, "num_cpus": e.num_cpus_per_worker, "num_gpus": 0.0, "threads": 1,
         "engine": e.name},
        {"role": "learner", "count": lrn.world_size, "num_cpus": lrn.num_cpus_per_rank, "num_gpus": lrn.num_gpus_per_rank,
         "threads": lrn.torch_threads_per_rank, "engine": f"FSDP2 over {'nccl' if cfg.device == 'cuda' else 'gloo'}"},
        {"role": "driver", "count": 1, "num_cpus": 0.0, "num_gpus": 0.0, "threads": 1, "engine": "holds no weights"},
    ]


def describe_placement(cfg: Config) -> str:
    rows = placement(cfg)
    lines = [f"{'role':<12}{'count':>6}{'cpus each':>11}{'gpus each':>11}{'threads':>9}  what"]
    for p in rows:
        lines.append(f"{p['role']:<12}{p['count']:>6}{p['num_cpus']:>11g}{p['num_gpus']:>11g}{p['threads']:>9}  {p['engine']}")
    cpus = sum(p["count"] * p["num_cpus"] for p in rows)
    gpus = sum(p["count"] * p["num_gpus"] for p in rows)
    lines.append(f"total: {cpus:g} CPUs, {gpus:g} GPUs requested; cluster: {cluster_target(cfg)}")
    return "\n".join(lines)


def cluster_target(cfg: Config) -> str:
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    return f"attach to {address}" if address else f"local, {cfg.ray.num_cpus or os.cpu_count()} CPUs"


def check_fits_locally(cfg: Config) -> None:
    """A local cluster that cannot hold every actor would hang at start-up: fail before that."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    available = cfg.ray.num_cpus or os.cpu_count() or 1
    wanted = sum(p["count"] * p["num_cpus"] for p in placement(cfg))
    if wanted > available + 1e-9:
        raise ValueError(
            f"the actors ask for {wanted:g} CPUs but the local cluster has {available}: lower "
            "rollout.num_cpus_per_replica, learner.num_cpus_per_rank or environment.num_cpus_per_worker, "
            "or raise ray.num_cpus"
        )


def start_ray(cfg: Config) -> bool:
    """Returns whether this call started Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():  # a notebook or a test that already started one
        return False
    env = {"env_vars": dict(ACTOR_ENV)}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:  # e.g. under `ray job submit`
        ray.init(address=address, runtime_env=env, log_to_driver=cfg.logging.actor_logs)
        return True
    else:
        # address="local" never re-attaches to a stale cluster left by an earlier run.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env=env, log_to_driver=cfg.logging.actor_logs)
    return True


def start_actor(cls, args: tuple = (), kwargs: dict | None = None, *, num_cpus: float, num_gpus: float = 0.0,
                placement_group=None, bundle: int = 0, **options):
    """``cls(*args, **kwargs)`` as a Ray actor (``cls``: a plain class, or one already wrapped by
    ray.remote), inside bundle ``bundle`` of ``placement_group`` when one is given; ``options``: more
    actor options (e.g. max_restarts). The one way the driver makes actors."""
    import ray

    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=bundle)
    actor = cls if isinstance(cls, ray.actor.ActorClass) else ray.remote(cls)
    return actor.options(num_cpus=num_cpus, num_gpus=num_gpus, **options).remote(*args, **(kwargs or {}))


def colocated_placement_group(cfg: Config):
    """Colocated GPUs: one bundle per learner rank holding that rank's GPU share and its rollout
    replica's, so that learner rank i and replica i land on the same GPU (CUDA IPC needs it).
    None for every other placement."""
    if cfg.device != "cuda" or cfg.rollout.placement != "colocated":
        return None
    import ray
    from ray.util.placement_group import placement_group

    r, lrn = cfg.rollout, cfg.learner
    if r.replicas > lrn.world_size:
        raise ValueError(f"rollout.placement=colocated puts replica i on learner rank i's GPU: rollout.replicas={r.replicas} "
                         f"must be <= learner.world_size={lrn.world_size}")
    bundle = {"GPU": lrn.num_gpus_per_rank + r.num_gpus_per_replica, "CPU": lrn.num_cpus_per_rank + r.num_cpus_per_replica}
    group = placement_group([bundle] * lrn.world_size, strategy="PACK")
    ray.get(group.ready())
    return group
