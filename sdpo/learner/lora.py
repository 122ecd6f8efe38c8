"""LoRA adapters on the FSDP2 learner (``model.lora``): the policy is a frozen base plus PEFT
adapters, and the teacher is a second set of adapter values on the same base.

Why adapters make SDPO's teacher cheap: an EMA teacher of a fully trained model is a second full
model; with adapters it is a second copy of the adapters only (``TeacherAdapters``). The teacher's
forward runs the student's own modules with the teacher's adapter values swapped in, so the base
weights exist once. Both adapter sets are sharded like the base (FSDP2, dim 0), so the EMA stays a
local lerp on each rank's rows, as for full weights.

Names: adapters are injected with PEFT's ``inject_adapter_in_model`` (the model keeps its class and
the base names gain ``.base_layer``: ``...q_proj.base_layer.weight``, ``...q_proj.lora_A.default.weight``).
``hf_name`` maps back to the checkpoint's names; ``peft_name`` to PEFT's saved-adapter names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sdpo.weight_sync.adapters import ADAPTER, is_adapter

_WRAPPED = "_checkpoint_wrapped_module."  # activation checkpointing's prefix in parameter names


def hf_name(name: str) -> str:
    """The base checkpoint's name of a (non-adapter) model tensor: ``q_proj.base_layer.weight`` -> ``q_proj.weight``."""
    return name.replace(_WRAPPED, "").replace(".base_layer.", ".")


def peft_name(name: str) -> str:
    """The name PEFT saves an adapter tensor under (``save_pretrained``'s adapter_model.safetensors)."""
    return "base_model.model." + name.replace(_WRAPPED, "").replace(f".{ADAPTER}.", ".")


def add_adapters(model: torch.nn.Module, lora) -> None:
    """Inject LoRA adapters (``lora``: config.LoraConfig) into ``model``, before it is sharded; only
    they require grad. Works on the meta device: ``init_adapters`` gives them values once sharded."""
    from peft import LoraConfig, inject_adapter_in_model

    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias="none")
    try:
        inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora.target_modules={lora.target_modules}: {err}") from None
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


def adapter_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every adapter tensor, in module order (the same on every rank)."""
    return [(name, p) for name, p in model.named_parameters() if is_adapter(name)]


@torch.no_grad()
def init_adapters(model: torch.nn.Module, seed: int) -> None:
    """PEFT's initialisation (A: kaiming-uniform as nn.Linear, B: zeros, so the initial policy is the
    base model), drawn whole from one seeded generator and cut into this rank's rows: the same
    adapters whatever the number of ranks."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in adapter_params(model):
        full = torch.zeros(param.shape)
        if ".lora_A." in name:
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        _local(param).copy_(_rows_of(param, full))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _rows_of(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's block of ``full`` for a (possibly FSDP2-sharded) parameter."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return full[offset[0] : offset[0] + shape[0]]


def _gather(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def merged_full_tensors(model: torch.nn.Module, scale: float, skip_tied: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) of the model with its adapters merged in (W + scale * B @ A):
    what an engine without LoRA support loads. A collective (every rank walks the same tensors,
    gathering one at a time); ``skip_tied``: a tensor tied to an earlier one is left out, as in
    ``weight_sync.learner_side.iter_full_tensors``."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    unique = {name for name, _ in model.named_parameters()}
    held: dict[str, torch.Tensor] = {}  # a module's base weight and lora_A, until its lora_B arrives
    for name, tensor in model.state_dict().items():
        if skip_tied and name in params and name not in unique:
            continue
        full = _gather(tensor)
        if name.endswith(".base_layer.weight") or ".lora_A." in name:
            held[name] = full
            continue
        if ".lora_B." in name:
            module = name.split(".lora_B.")[0]
            base, a = held.pop(module + ".base_layer.weight"), held.pop(f"{module}.lora_A.{ADAPTER}.weight")
            merged = base + scale * (full.to(base.dtype) @ a.to(base.dtype))
            yield hf_name(module + ".weight"), merged
            continue
        yield hf_name(name), full
    if held:
        raise RuntimeError(f"adapter tensors without their partner: {sorted(held)[:3]}")


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters, full (a collective), under PEFT's saved names."""
    return {peft_name(name): _gather(tensor) for name, tensor in model.state_dict().items() if is_adapter(name)}


class TeacherAdapters:
    """The teacher's adapter values: a copy of the policy's adapter shards (same names, same
    sharding), swapped into the policy's modules around a teacher forward."""

    def __init__(self, model: torch.nn.Module):
        # DTensors like the parameters: a torch.distributed.checkpoint of them is sharded the same way
        self.tensors = {name: p.detach().clone() for name, p in adapter_params(model)}

    def shards(self) -> list[torch.Tensor]:
        return [_local(t) for t in self.tensors.values()]

    @torch.no_grad()
    def lerp_(self, model: torch.nn.Module, rate: float) -> None:
        """EMA: teacher <- (1 - rate) teacher + rate policy, each rank on its own rows."""
        for (_, p), t in zip(adapter_params(model), self.shards()):
            t.lerp_(_local(p), rate)

    @contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """``model`` computes as the teacher inside (eval mode: no adapter dropout); the policy's
        values and mode are back afterwards. The copies go into the FSDP2 shards themselves, which
        each forward gathers afresh."""
        params = [_local(p) for _, p in adapter_params(model)]
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for p, t in zip(params, self.shards()):
                p.copy_(t)
        training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(training)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
