"""Shortcuts that hold when the learner is one rank (`learner.world_size=1`; sdpo/sizing.py picks it for small models on a GPU).

With one rank every FSDP2 shard is the whole tensor, so the full state for a weight push is the
local tensors themselves: no gather, no state-dict machinery (torch's `get_model_state_dict` with
`full_state_dict=True` walks every parameter through its distributed path, tens of ms for a 0.6M
model on a loaded 2-core machine; benchmarks/RESULTS.md, "End to end").
"""

from __future__ import annotations

import torch


def local_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named full tensors of a one-rank FSDP2 model (DTensor shards are whole), detached, on CPU.
    Tied parameters appear under each of their names, as `get_model_state_dict` gives them."""
    state = {}
    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        state[name] = local.detach().to("cpu")
    return state
