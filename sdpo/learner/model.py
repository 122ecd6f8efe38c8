"""Building a causal LM and sharding it with FSDP2. Knows nothing about losses or environments."""

from __future__ import annotations

import json

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from sdpo.learner.lora import add_adapters, hf_name, init_adapters, is_adapter
from sdpo.learner.packing import PACKED_SDPA, pack
from sdpo.weight_sync.files import SAFETENSORS_DTYPES, read_header


def pick_attention(requested: str, device: str, packed: bool = False, mixed_precision: str = "no") -> str:
    """auto: flash-attn on CUDA when it imports and the learner computes in bf16 (flash-attn takes
    fp16/bf16 only; under learner.mixed_precision=no the forward is fp32), else SDPA."""
    if requested == "flash_attention_2" and mixed_precision != "bf16":
        raise ValueError("model.attn_implementation=flash_attention_2 needs learner.mixed_precision=bf16: flash-attn "
                         "rejects fp32 inputs")
    if requested != "auto":
        return requested
    if device == "cuda" and mixed_precision == "bf16":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"  # varlen kernel: packed rows need nothing else
        except ImportError:
            pass
    # CPU (or GPU without flash-attn): the fused SDPA kernel, per sample when rows are packed.
    return PACKED_SDPA if packed else "sdpa"


def load_causal_lm(path: str, attn_implementation: str) -> torch.nn.Module:
    # fp32 master weights; mixed precision is FSDP's job (param_dtype), not the checkpoint's.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)


def load_sharded(path: str, attn_implementation: str, mesh: DeviceMesh, mixed_precision: str, device: torch.device, *,
                 no_grad: bool = False, offload: bool = False, checkpointing: bool = False, lora=None,
                 seed: int = 0) -> torch.nn.Module:
    """The model at `path`, sharded with FSDP2, without ever holding it whole: built on the meta
    device, sharded, given empty storage for this rank's shards only (torch's documented FSDP2
    meta-device flow: fully_shard, then to_empty), then each shard read from the checkpoint's
    safetensors as a slice of rows. A rank's host memory peaks at its shards plus one tensor's
    slice, instead of a full fp32 copy (and a second, deep-copied, for the teacher) per rank.

    ``lora`` (config.LoraConfig, enabled): PEFT adapters are injected before sharding (base frozen,
    adapters trainable) and initialised from ``seed`` (sdpo/learner/lora.py)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    if lora is not None:
        add_adapters(model, lora)
    if checkpointing:
        checkpoint_layers(model)
    if no_grad:
        model.requires_grad_(False)
    shard(model, mesh, mixed_precision, no_grad=no_grad, offload=offload)
    model.to_empty(device=torch.device("cpu") if offload else device)
    _fill_from_safetensors(model, path)
    _rebuild_buffers(model, device)
    if lora is not None:
        init_adapters(model, seed)
    return model


@torch.no_grad()
def _fill_from_safetensors(model: torch.nn.Module, path: str) -> None:
    """Each tensor's rows for this rank, read with plain file reads straight into the shard (no
    memory map: mapped pages of the file would count in this process's resident memory)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    # by the checkpoint's names: LoRA's wrapped base layers are found under their plain names, and
    # the adapters are not in the checkpoint
    wanted = {hf_name(name): t for name, t in model.state_dict().items() if not is_adapter(name)}
    tied = {hf_name(name) for name, _ in model.named_parameters(remove_duplicate=False)} - {
        hf_name(name) for name, _ in model.named_parameters()}
    missing = set(wanted) - tied
    for file in _safetensors_files(path):
        with open(file, "rb") as f:
            data_start, header = read_header(f)
            for name, entry in header.items():
                if name not in wanted:
                    raise ValueError(f"{file}: tensor {name!r} is not in {type(model).__name__}")
                target = wanted[name]
                if isinstance(target, DTensor):
                    # this rank's block of the global tensor (FSDP2 shards dim 0, torch.chunk-style)
                    local_shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                                target.placements)
                    local, first_row = target.to_local(), offset[0]
                else:
                    local, first_row = target, 0
                if local.numel():
                    _read_rows(f, data_start, entry, first_row, local)
                missing.discard(name)
    if missing:
        raise ValueError(f"{path}: the checkpoint has no {sorted(missing)[:3]} ({len(missing)} tensors missing)")
    # a tied head (lm_head = embed_tokens) is one parameter: filled through its first name


def _read_rows(f, data_start: int, entry: dict, first_row: int, out: torch.Tensor) -> None:
    """Rows [first_row, first_row + len(out)) of a row-major tensor in a safetensors file (format:
    8-byte header length, JSON header with dtype, shape and data_offsets, then the raw bytes)."""
    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
    if list(out.shape) != list(shape) and (not shape or list(out.shape[1:]) != list(shape[1:])
                                           or first_row + out.shape[0] > shape[0]):
        raise ValueError(f"checkpoint tensor of shape {shape} does not fit a shard of shape {tuple(out.shape)}")
    row_bytes = out[0].numel() * torch.empty((), dtype=dtype).element_size() if shape else out.element_size()
    f.seek(data_start + entry["data_offsets"][0] + first_row * row_bytes)
    if dtype == out.dtype and out.is_contiguous() and out.device.type == "cpu":
        f.readinto(memoryview(out.view(torch.uint8).numpy()).cast("B"))  # straight into the shard
        return
    buffer = torch.empty(out.shape, dtype=dtype)
    f.readinto(memoryview(buffer.view(torch.uint8).numpy()).cast("B"))
    out.copy_(buffer)  # a bf16 checkpoint into fp32 master weights, or onto the GPU


def _safetensors_files(path: str) -> list[str]:
    import glob
    import os

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights (meta-device loading reads safetensors only)")
    return files


def _rebuild_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are in no checkpoint and to_empty left them uninitialised: compute
    them again. In transformers' decoder models they are the rotary embedding's inverse frequencies."""
    for module in model.modules():
        own = [name for name, _ in module.named_buffers(recurse=False) if name in module._non_persistent_buffers_set]
        if not own:
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            raise NotImplementedError(f"{type(module).__name__} has non-persistent buffers {own} that meta-device "
                                      "loading cannot rebuild")
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        for name in own:
            setattr(module, name, getattr(fresh, name).to(getattr(module, name).device))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (or their checkpoint wrappers): the unit FSDP2 shards and
    gathers one at a time."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"{type(model).__name__}: found no *DecoderLayer modules to shard")
    return [_outermost(model, layer) for layer in layers]


def _outermost(model: torch.nn.Module, layer: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if getattr(module, "_checkpoint_wrapped_module", None) is layer:
            return module
    return layer


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Activation checkpointing per decoder layer: backward recomputes each layer's forward instead
    of keeping its activations. Applied before sharding, so FSDP's gather hooks sit outside the
    recomputed region (the wrapper strips its prefix from state-dict names)."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("DecoderLayer"):
            parent_name, _, child = name.rpartition(".")
            model.get_submodule(parent_name).register_module(child, checkpoint_wrapper(module))


def shard(model: torch.nn.Module, mesh: DeviceMesh, mixed_precision: str, *, no_grad: bool = False,
          offload: bool = False) -> torch.nn.Module:
    """FSDP2 per decoder layer and at the root, each layer prefetching its neighbour's parameters
    (the next in forward, the previous in backward) while it computes.

    A no-grad model (the teacher) also reshards its root after forward: FSDP2 otherwise keeps root
    parameters gathered, waiting for a backward that never comes, and the teacher would hold full
    copies of the embeddings between steps. ``offload`` keeps the shards in host memory; they are
    copied to the device per layer for the forward."""
    bf16 = mixed_precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    placement = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if offload else OffloadPolicy()
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=placement)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=placement, reshard_after_forward=True if no_grad else None)
    for earlier, later in zip(layers, layers[1:]):
        earlier.set_modules_to_forward_prefetch([later])
        if not no_grad:
            later.set_modules_to_backward_prefetch([earlier])
    return model


def _padded_batch(prompts: list[list[int]], responses: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Right-padded, so causal attention never sees the padding before a real token.
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[row, : len(p) + len(r)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _response_rows(per_position: torch.Tensor, prompts: list[list[int]], responses: list[list[int]], offset: int = 0) -> torch.Tensor:
    # Position t predicts token t+1: a response's predictions start one before it. ``offset``: the
    # row position of per_position's first column.
    return torch.cat([per_position[row, len(p) - 1 - offset : len(p) + len(r) - 1 - offset]
                      for row, (p, r) in enumerate(zip(prompts, responses))])


def response_logits(model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], device: torch.device,
                    packed: bool = False, share_prompts: bool = False) -> torch.Tensor:
    """Logits that predict each response token, for a micro-batch: (sum of response lengths, V).
    ``share_prompts`` (packed rows, sdpa_packed attention): identical prompts go through once."""
    if packed:
        row = pack(prompts, responses, device, share_prompts)
        # Only the response positions go through the LM head: the (long) teacher prompt gets no logits.
        return model(**row.forward_kwargs(), logits_to_keep=row.response_rows).logits[0]
    input_ids, attention_mask = _padded_batch(prompts, responses, device)
    # LM head only from the earliest response prediction on (prompts get no logits); the kept
    # positions are the last `keep` of each row.
    keep = input_ids.shape[1] - min(len(p) for p in prompts) + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    return _response_rows(logits, prompts, responses, offset=input_ids.shape[1] - keep)


def response_hidden(model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], device: torch.device,
                    packed: bool = False, share_prompts: bool = False) -> torch.Tensor:
    """The final hidden states (after the last norm) that predict each response token: (N, H).

    Runs the whole model through its root forward, so FSDP gathers and frees parameters as usual,
    but asks for the logits of one position only: the (N, V) logits are left to the chunked loss.
    """
    captured = []
    hook = model.get_decoder().register_forward_hook(lambda _m, _i, out: captured.append(out.last_hidden_state))
    try:
        if packed:
            row = pack(prompts, responses, device, share_prompts)
            model(**row.forward_kwargs(), logits_to_keep=1)
        else:
            input_ids, attention_mask = _padded_batch(prompts, responses, device)
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    if packed:
        return captured[0][0, row.response_rows]
    return _response_rows(captured[0], prompts, responses)


def lm_head_weight(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The output projection (V, H), whole, in the compute ``dtype`` of the hidden states. The
    student's root stays gathered between its forward and backward, so this is FSDP's unsharded
    parameter (already in the mixed-precision dtype) and its gradient flows back through FSDP; a
    resharded (teacher) weight is gathered here from its fp32 shards and cast as the model's own
    forward would have."""
    weight = model.get_output_embeddings().weight
    return full_weight(weight).to(dtype)


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) parameter. `full_tensor()` runs its all-gather
    on the mesh's device type: a CPU-offloaded shard (teacher_offload) under an NCCL-only process
    group must be on that device first, as torch's own state-dict gathering does
    (torch/distributed/_state_dict_utils.py, _iterate_state_dict: value.to(device_mesh.device_type))."""
    if not hasattr(weight, "full_tensor"):  # a DTensor (duck-typed: anything that gathers)
        return weight
    mesh_device = weight.device_mesh.device_type
    if weight.device.type != mesh_device:
        weight = weight.to(mesh_device)
    return weight.full_tensor()
