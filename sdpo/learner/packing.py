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

Shared prompts (``learner.share_prompts``, ``sdpa_packed`` only): samples of a micro-batch whose
prompt ids are identical (a prompt's samples for the student; siblings shown the same
demonstration for the teacher) become one segment, the prompt once and then each response. A
response attends to its prompt's keys and values and to its own causal past, with positions
continuing from the prompt length, exactly what it would see packed alone; the prompt's last
position predicts the first token of every response that shares it. Fewer tokens go through
every layer (a quickstart step's teacher rows shrink ~6x), and the student's gradient reaches the
shared prompt once, summed over its responses, as the unshared forward's per-copy gradients would.
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
    shared: SharedLayout | None = None  # set when samples with the same prompt share one copy of it

    def forward_kwargs(self) -> dict:
        # use_cache=False: with a KV cache transformers would not detect the packing (and a training
        # forward has no use for the cache's copy of every layer's keys and values).
        if self.shared is not None:
            # No cu_seq_lens: a kernel that reads them (flash) would attend within the wrong spans.
            return dict(input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False, shared_prompts=self.shared)
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False, cu_seq_lens_q=self.cu_seq_lens,
                    cu_seq_lens_k=self.cu_seq_lens, max_length_q=self.max_length, max_length_k=self.max_length)


@dataclass
class SharedLayout:
    """Where each attention query of a shared-prompt row looks, as gather indices into the row, so
    that a layer's attention is two batched SDPA calls whatever the number of samples:

    - prompts: (G, P) the G distinct prompts' row positions, right-padded to the longest P; causal
      within each prompt (``prompt_mask`` None when all prompts have length P: plain causal).
    - responses: (R, Q) each non-empty response's row positions, right-padded; its keys (R, P + Q)
      are its prompt's positions then its own, and ``response_mask`` lets query i see the real
      prompt keys and its own keys 0..i (the bottom-right-aligned causal mask of a query block
      that comes after its prompt).
    - ``assemble`` (L,): each row position's place in the two calls' outputs, flattened and
      concatenated (prompts first), so that one gather puts the attention output back in row order.

    Padded queries attend to at least one real key (no NaN) and their outputs are never gathered.
    """

    prompt_index: torch.Tensor
    prompt_mask: torch.Tensor | None
    response_index: torch.Tensor | None
    response_keys: torch.Tensor | None
    response_mask: torch.Tensor | None
    assemble: torch.Tensor


def pack(prompts: list[list[int]], responses: list[list[int]], device: torch.device, share_prompts: bool = False) -> PackedRow:
    """One packed row of a micro-batch; with ``share_prompts``, identical prompts are packed once."""
    if share_prompts:
        return _pack_shared(prompts, responses, device)
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


def _pack_shared(prompts: list[list[int]], responses: list[list[int]], device: torch.device) -> PackedRow:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError("a training sample has an empty prompt: every sample needs at least one prompt token")
        groups.setdefault(tuple(prompt), []).append(i)
    ids: list[int] = []
    positions: list[int] = []
    rows: list[list[int]] = [[] for _ in prompts]
    prompt_spans: list[tuple[int, int]] = []  # (row start, length) of each distinct prompt
    response_spans: list[tuple[int, int, int]] = []  # (row start, length, its prompt's group) of each non-empty response
    bounds = [0]
    for g, (prompt, members) in enumerate(groups.items()):
        start = len(ids)
        ids += prompt
        positions += range(len(prompt))
        prompt_spans.append((start, len(prompt)))
        last_prompt_position = start + len(prompt) - 1
        for i in members:
            response = responses[i]
            if not response:
                continue
            response_start = len(ids)
            ids += response
            positions += range(len(prompt), len(prompt) + len(response))
            # The prompt's last position predicts the first token; then each token predicts the next.
            rows[i] = [last_prompt_position, *range(response_start, response_start + len(response) - 1)]
            response_spans.append((response_start, len(response), g))
        bounds.append(len(ids))
    layout = _shared_layout(prompt_spans, response_spans, len(ids), device)
    return PackedRow(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.int32, device=device),  # segments; not read by the attention
        max_length=max(b - a for a, b in zip(bounds, bounds[1:])),
        response_rows=torch.tensor([r for sample_rows in rows for r in sample_rows], dtype=torch.long, device=device),
        shared=layout,
    )


def _shared_layout(prompt_spans: list[tuple[int, int]], response_spans: list[tuple[int, int, int]], length: int,
                   device: torch.device) -> SharedLayout:
    P = max(n for _, n in prompt_spans)
    steps_p = torch.arange(P)
    prompt_starts = torch.tensor([s for s, _ in prompt_spans])
    prompt_lens = torch.tensor([n for _, n in prompt_spans])
    # padding repeats the last real position: any real index will do, it is masked or never gathered
    prompt_index = prompt_starts[:, None] + torch.minimum(steps_p[None, :], prompt_lens[:, None] - 1)
    prompt_mask = None
    if (prompt_lens != P).any():
        prompt_mask = (steps_p[None, None, :] <= steps_p[None, :, None]) & (steps_p[None, None, :] < prompt_lens[:, None, None])
        prompt_mask = prompt_mask[:, None].to(device)
    assemble = torch.empty(length, dtype=torch.long)
    for g, (start, n) in enumerate(prompt_spans):
        assemble[start : start + n] = g * P + torch.arange(n)
    response_index = response_keys = response_mask = None
    if response_spans:
        Q = max(n for _, n, _ in response_spans)
        steps_q = torch.arange(Q)
        starts = torch.tensor([s for s, _, _ in response_spans])
        lens = torch.tensor([n for _, n, _ in response_spans])
        group = torch.tensor([g for _, _, g in response_spans])
        response_index = starts[:, None] + torch.minimum(steps_q[None, :], lens[:, None] - 1)
        response_keys = torch.cat([prompt_index[group], response_index], dim=1)
        sees_prompt = (steps_p[None, None, :] < prompt_lens[group][:, None, None]).expand(-1, Q, -1)
        sees_own = (steps_q[None, None, :] <= steps_q[None, :, None]) & (steps_q[None, None, :] < lens[:, None, None])
        response_mask = torch.cat([sees_prompt, sees_own], dim=2)[:, None].to(device)
        offset = len(prompt_spans) * P
        for j, (start, n, _) in enumerate(response_spans):
            assemble[start : start + n] = offset + j * Q + torch.arange(n)
        response_index, response_keys = response_index.to(device), response_keys.to(device)
    return SharedLayout(prompt_index=prompt_index.to(device), prompt_mask=prompt_mask, response_index=response_index,
                        response_keys=response_keys, response_mask=response_mask, assemble=assemble.to(device))


def _shared_sdpa(module, query, key, value, layout: SharedLayout, dropout: float, scaling: float | None):
    """Attention of a shared-prompt row (see SharedLayout); q/k/v are (1, heads, L, head_dim)."""
    q, k, v = query[0], key[0], value[0]

    def attend(queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # (heads, B, n, d) gathers -> (B, heads, n, d); the backward of a gather sums the gradients
        # of a shared prompt key over every response that read it.
        out, _ = sdpa_attention_forward(module, q[:, queries].transpose(0, 1), k[:, keys].transpose(0, 1),
                                        v[:, keys].transpose(0, 1), mask, dropout=dropout, scaling=scaling,
                                        is_causal=mask is None)
        return out.flatten(0, 1)  # (B * n, heads, d)

    outputs = [attend(layout.prompt_index, layout.prompt_index, layout.prompt_mask)]
    if layout.response_index is not None:
        outputs.append(attend(layout.response_index, layout.response_keys, layout.response_mask))
    return torch.cat(outputs)[layout.assemble].unsqueeze(0), None  # (1, L, heads, d)


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """Causal SDPA on each sample's slice of a packed row; q/k/v are (1, heads, L, head_dim).
    Without ``cu_seq_lens_q`` (an unpacked, right-padded batch) it is plain SDPA."""
    if kwargs.get("shared_prompts") is not None:
        if query.shape[0] != 1:
            raise ValueError(f"{PACKED_SDPA}: a packed batch is one row, got {query.shape[0]} rows")
        return _shared_sdpa(module, query, key, value, kwargs["shared_prompts"], dropout, scaling)
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
