"""Fallback rollout engine on plain transformers: runs wherever torch runs (macOS, ARM, no vLLM).

Sampling is our own loop over a KV cache rather than `model.generate`, so that the returned
log-probs are exactly those of the distribution each token was drawn from (see base.py).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DynamicCache

from sdpo.rollout.base import Completion, RolloutEngine, Sampling

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution to sample from: logits / temperature, renormalised over the
    top-p nucleus (tokens outside it get -inf). Temperature 0 means greedy: untempered log-probs."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if 0 < top_p < 1 and temperature > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # keep a token if the mass of the tokens ranked above it is still below top_p
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.log_softmax(dim=-1)


class HFEngine(RolloutEngine):
    kind = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 2048,
        device: str | None = None,
        score_tokens_per_batch: int = 16384,
        weight_sync_timeout_s: float = 600.0,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=_resolve_dtype(dtype), attn_implementation="sdpa"
        ).to(self.device)
        self.model.eval()
        self.seed = seed
        self.max_model_len = max_model_len
        self.score_tokens_per_batch = score_tokens_per_batch
        self.weight_sync_timeout_s = weight_sync_timeout_s

    @torch.no_grad()
    def generate(self, prompts, sampling: Sampling):
        n, temperature, top_p = sampling.n, sampling.temperature, sampling.top_p
        rows = [list(p) for p in prompts for _ in range(n)]
        if not rows:
            return [[] for _ in prompts]
        for p in rows:
            if not 0 < len(p) < self.max_model_len:
                raise ValueError(f"prompt length {len(p)} must be in [1, max_model_len={self.max_model_len})")
        budgets = [min(sampling.max_new_tokens, self.max_model_len - len(p)) for p in rows]
        stop = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.long, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(sampling.seed)

        # Left-pad so that every row's next token sits in the last column.
        width = max(len(p) for p in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, p in enumerate(rows):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        cache = DynamicCache(config=self.model.config)
        tokens, logprobs = [[] for _ in rows], [[] for _ in rows]
        done, stopped = [False] * len(rows), [False] * len(rows)
        for _ in range(max(budgets)):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            logp = sampling_logprobs(out.logits[:, -1, :], temperature, top_p)
            if temperature > 0:
                next_ids = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            else:
                next_ids = logp.argmax(dim=-1)
            next_logp = logp.gather(-1, next_ids[:, None]).squeeze(-1)
            is_stop = torch.isin(next_ids, stop).tolist()
            for i, (t, lp) in enumerate(zip(next_ids.tolist(), next_logp.tolist())):
                if not done[i]:
                    tokens[i].append(t)
                    logprobs[i].append(lp)
                    stopped[i] = is_stop[i]
                    done[i] = is_stop[i] or len(tokens[i]) >= budgets[i]
            if all(done):
                break
            # finished rows keep decoding garbage that is never read: simpler than shrinking the cache
            input_ids = next_ids[:, None]
            position_ids = position_ids[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)

        completions = [
            Completion(token_ids=t, logprobs=lp, finish_reason="stop" if s else "length")
            for t, lp, s in zip(tokens, logprobs, stopped)
        ]
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def score(self, prompt_ids, response_ids):
        pairs = [(list(p), list(r)) for p, r in zip(prompt_ids, response_ids)]
        scores: list[list[float]] = [[] for _ in pairs]
        # Longest first, in batches under a token budget; right padding needs no position ids.
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        start = 0
        while start < len(order):
            width = len(pairs[order[start]][0]) + len(pairs[order[start]][1])
            size = max(1, self.score_tokens_per_batch // max(width, 1))
            batch = order[start : start + size]
            start += size
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                seq = pairs[i][0] + pairs[i][1]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(batch):
                p, r = pairs[i]
                if not r:
                    continue
                # logits at position t predict token t + 1
                lp = logits[row, len(p) - 1 : len(p) + len(r) - 1].float().log_softmax(-1)
                target = torch.tensor(r, device=lp.device)[:, None]
                scores[i] = lp.gather(-1, target).squeeze(-1).tolist()
        return scores

    # Bucketed and broadcast updates copy tensor by tensor into the live parameters: an HF model
    # needs no post-processing, so there is nothing to defer to the end.
    def begin_weight_update(self) -> None:
        self._pending = {name for name in self.model.state_dict() if not self._tied_head(name)}

    def load_weight_bucket(self, handle: dict, metas_json: list) -> None:
        from sdpo.weight_sync.handles import open_named

        self._copy_in(open_named(handle, metas_json, self.device))

    def finish_weight_update(self) -> None:
        missing, self._pending = sorted(getattr(self, "_pending", set())), set()
        if missing:
            raise ValueError(f"weight update ended without {len(missing)} tensors, e.g. {missing[:3]}")

    def join_weight_group(self, backend, master_addr, master_port, rank_offset, world_size) -> None:
        from sdpo.weight_sync.broadcast import join_weight_group

        self._group = join_weight_group(backend, master_addr, master_port, rank_offset, world_size, device=self.device,
                                        timeout_s=self.weight_sync_timeout_s)

    def receive_weights(self) -> None:
        from sdpo.weight_sync.broadcast import receive_weights

        self.begin_weight_update()
        self._copy_in(receive_weights(self._group))
        self.finish_weight_update()

    @torch.no_grad()
    def _copy_in(self, named_tensors) -> None:
        state = self.model.state_dict()  # shares storage with the parameters
        for name, tensor in named_tensors:
            if name not in state:
                raise ValueError(f"weight update names {name!r}, which the model does not have")
            state[name].copy_(tensor)
            self._pending.discard(name)

    def _tied_head(self, name: str) -> bool:
        return bool(self.model.config.tie_word_embeddings) and name.endswith("lm_head.weight")

    def load_weights(self, path: str) -> None:
        state = load_file(path, device=str(self.device))
        # strict: a missing or misnamed tensor must fail loudly, not leave stale weights behind.
        # A tied model's state dict may omit lm_head.weight: it is the embedding.
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if self.model.config.tie_word_embeddings:
            missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ValueError(
                f"weights at {path} do not match the model: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )

    def load_adapter(self, path: str, version: int) -> None:
        """PEFT adapters injected into the model once (on the first call, from the folder's config),
        then their values replaced from each new folder: the base weights are never touched."""
        import os

        from peft import LoraConfig, inject_adapter_in_model

        from sdpo.weight_sync.adapters import ADAPTER, in_model_name, is_adapter

        if not getattr(self, "_has_adapters", False):
            inject_adapter_in_model(LoraConfig.from_pretrained(path), self.model, adapter_name=ADAPTER)
            self.model.to(self.device).eval()
            self._has_adapters = True
        state = {in_model_name(name): t
                 for name, t in load_file(os.path.join(path, "adapter_model.safetensors"), device=str(self.device)).items()}
        wanted = {name for name in self.model.state_dict() if is_adapter(name)}
        if set(state) != wanted:
            raise ValueError(f"adapter at {path} does not match the model's adapters: missing {sorted(wanted - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - wanted)[:3]}")
        self.model.load_state_dict(state, strict=False)
