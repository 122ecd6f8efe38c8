"""Rollout engines: the interface (base.py), the engines (vLLM, HF), the Ray worker and the pool.

`make_engine` lives here rather than in base.py so that the interface imports no engine."""

from __future__ import annotations

from sdpo.rollout.base import Completion, RolloutEngine, Sampling  # noqa: F401  (the package's types)

ENGINE_KINDS = ("auto", "vllm", "hf")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. CUDA torchvision next to CPU torch)
        return False
    return True


def make_engine(kind: str, model_path: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int = 2048,
                **options) -> RolloutEngine:
    """Build a rollout engine. kind: "vllm", "hf", or "auto" (vLLM if it imports, else HF).
    `options`: the vLLM engine's device settings (kv_cache_gib, gpu_memory_utilization,
    enforce_eager, chunked_prefill, enable_sleep_mode, weight_sync_timeout_s; see VLLMEngine and
    sdpo/placement.py); the HF engine takes none of them but weight_sync_timeout_s."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"rollout engine kind must be one of {ENGINE_KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind == "vllm":
        from sdpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len, **options)
    from sdpo.rollout.hf_engine import HFEngine

    return HFEngine(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                    weight_sync_timeout_s=options.get("weight_sync_timeout_s", 600.0))  # (adapters need no lora_rank)
