"""The adapter folder: how LoRA adapters travel from the learner to the rollout engines and out of a
run (model.lora). It is PEFT's saved format, adapter_config.json + adapter_model.safetensors, which
PeftModel.from_pretrained, vLLM's LoRARequest and our HF engine all load. Shared by the learner side
(which writes it) and the rollout side (which reads it), so it lives with the weight transports.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

ADAPTER = "default"  # PEFT's in-model adapter name (``...lora_A.default.weight``); the saved format drops it


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def in_model_name(saved: str) -> str:
    """PEFT's saved name -> the name inside a model with injected adapters:
    ``base_model.model.X.lora_A.weight`` -> ``X.lora_A.default.weight``."""
    name = saved.removeprefix("base_model.model.")
    return name.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}.")


def adapter_payload(state: dict[str, torch.Tensor], lora, base_model: str) -> dict:
    """A PEFT adapter folder's two files as data (``{"adapter_config.json": str,
    "adapter_model.safetensors": bytes}``): small enough to travel through Ray to every engine
    (adapter-only sync), whatever node it is on."""
    from peft import LoraConfig
    from safetensors.torch import save

    from sdpo.weight_sync.files import savable

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    # config.to_dict, not save_pretrained: that also reads the base model's config (from the hub for a name)
    text = json.dumps(config.to_dict() | {"target_modules": sorted(lora.target_modules)}, indent=2, default=str)
    return {"adapter_config.json": text, "adapter_model.safetensors": save(savable(state), metadata={"format": "pt"})}


def write_adapter_folder(payload: dict, directory: str) -> str:
    """The PEFT adapter folder of ``adapter_payload``: PeftModel.from_pretrained and vLLM's LoRARequest
    load it. Written under a temporary name and renamed, so that no reader sees half of it."""
    tmp = f"{directory.rstrip('/')}.{os.getpid()}.tmp"
    os.makedirs(tmp, exist_ok=True)
    for name, data in payload.items():
        with open(os.path.join(tmp, name), "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


