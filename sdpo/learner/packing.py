"""Padding-free micro-batches: a micro-batch's sequences concatenated into one row, with attention
kept within each sample.

Positions restart at 0 for every sample, and the cumulative sequence lengths travel with the
forward as ``cu_seq_lens_q/k`` (transformers' names), so each attention implementation sees the
boundaries its own way:

- ``flash_attention_2`` (GPU): the varlen kernel reads ``cu_seq_lens`` directly.
- ``sdpa_packed`` (registered here; the CPU default when packing): plain causal SDPA on each
  sample's slice of the row. Cost is the sum of squared sample lengths, as with varlen kernels.
- ``sdpa`` / ``eager``: transformers builds a block-diagonal causal mask from the restarting
  ``position_ids``. Correct, but the mask and the attention are (row length)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_SDPA = "sdpa_packed"


@dataclass
class PackedRow:
    input_ids: torch.Tensor  # (1, L) every sample's prompt + response, back to back
    position_ids: torch.Tensor  # (1, L) restarting at 0 for each sample
    cu_seq_lens: torch.Tensor  # (S + 1,) int32 sample boundaries in the row
    max_length: int  # the longest sample
    response_rows: torch.Tensor  # (N,) row positions whose outputs predict the response tokens, in order

    def forward_kwargs(self) -> dict:
        # use_cache=False: with a KV cache transformers would not detect the packing (and a training
        # forward has no use for the cache's copy of every layer's keys and values).
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False, cu_seq_lens_q=self.cu_seq_lens,
                    cu_seq_lens_k=self.cu_seq_lens, max_length_q=self.max_length, max_length_k=self.max_length)


def pack(prompts: list[list[int]], responses: list[list[int]], device: torch.device) -> PackedRow:
    ids: list[int] = []
    positions: list[int] = []
    bounds = [0]
    rows: list[int] = []
    for prompt, response in zip(prompts, responses):
        if not prompt:
            # The first response token is predicted from the last prompt position; without one it
            # would be predicted from the previous sample's last token.
            raise ValueError("a training sample has an empty prompt: every sample needs at least one prompt token")
        start, length = len(ids), len(prompt) + len(response)
        ids += prompt + response
        positions += range(length)
        # Position t predicts token t+1: a response's predictions start one before it.
        rows += range(start + len(prompt) - 1, start + length - 1)
        bounds.append(start + length)
    return PackedRow(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.int32, device=device),
        max_length=max(b - a for a, b in zip(bounds, bounds[1:])),
        response_rows=torch.tensor(rows, dtype=torch.long, device=device),
    )


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """Causal SDPA on each sample's slice of a packed row; q/k/v are (1, heads, L, head_dim).
    Without ``cu_seq_lens_q`` (an unpacked, right-padded batch) it is plain SDPA."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    if query.shape[0] != 1:
        raise ValueError(f"{PACKED_SDPA}: a packed batch is one row, got {query.shape[0]} rows")
    outputs = []
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                        None, dropout=dropout, scaling=scaling, is_causal=True)
        outputs.append(out)  # (1, length, heads, head_dim)
    return torch.cat(outputs, dim=1), None


# No mask function is registered for this name on purpose: transformers then builds no (L, L) mask.
AttentionInterface.register(PACKED_SDPA, packed_sdpa)
