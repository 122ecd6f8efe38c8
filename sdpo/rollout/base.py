"""The rollout engine interface: token ids in, sampled token ids and their log-probs out.

Prompts are token ids: the framework applies chat templates itself and engines never re-tokenize,
so the learner trains on exactly the tokens the engine produced.

Log-prob semantics (the same for every engine):
- `Completion.logprobs[i]` is the log-prob of `token_ids[i]` under the distribution it was sampled
  from. At temperature 1 and top_p 1 that is the model's own distribution, so rollout log-probs can
  be compared with the learner's. At temperature T != 1 it is log_softmax(logits / T); with top_p < 1
  it is renormalised over the nucleus. At temperature 0 (greedy) it is the untempered model log-prob.
- `score` always returns untempered model log-probs under the current weights.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Sampling:
    """How to sample one call's completions (the same for every prompt of the call)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]  # only these stop a completion (no implicit EOS): pass the EOS id here
    seed: int  # the same seed and inputs give the same completions

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def with_seed(self, seed: int) -> "Sampling":
        return replace(self, seed=seed)


@dataclass
class Completion:
    token_ids: list[int]  # exactly the sampled ids, including the stop token if one was sampled
    logprobs: list[float]  # log-prob of each sampled token (see the module docstring)
    finish_reason: str  # "stop" (a stop token was sampled; it is the last id) or "length"
    # The weights that sampled it: the `version` of the last weight load (0 = the checkpoint at
    # start-up). Stamped by the rollout worker; -1 from a bare engine, which does not know versions.
    policy_version: int = -1


class RolloutEngine(abc.ABC):
    kind: str = ""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        """One list of `sampling.n` completions per prompt, in prompt order."""

    @abc.abstractmethod
    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Log-prob of each response token given the prompt and the previous response tokens,
        under the current weights (used to check that a weight sync landed)."""

    @abc.abstractmethod
    def load_weights(self, path: str) -> None:
        """Replace the weights with those in a safetensors file holding the full HF-named state dict."""

    # Bucketed weight updates (sdpo/weight_sync/): begin, any number of buckets, finish. A bucket arrives
    # as a handle (CUDA IPC or a shared-memory file) and JSON metadata; see sdpo/weight_sync/handles.py.
    def begin_weight_update(self) -> None:
        raise NotImplementedError(f"the {self.kind} engine has no bucketed weight updates: use rollout.weight_sync=shm")

    def load_weight_bucket(self, handle: dict, metas_json: list) -> None:
        raise NotImplementedError(f"the {self.kind} engine has no bucketed weight updates: use rollout.weight_sync=shm")

    def finish_weight_update(self) -> None:
        raise NotImplementedError(f"the {self.kind} engine has no bucketed weight updates: use rollout.weight_sync=shm")

    # LoRA adapter-only sync (model.lora.weight_sync=adapter): the base weights stay, and every
    # later generate / score applies the PEFT adapter folder at ``path`` (adapter_config.json +
    # adapter_model.safetensors). The engine must have been built with ``lora_rank``.
    def load_adapter(self, path: str, version: int) -> None:
        raise NotImplementedError(f"the {self.kind} engine cannot apply LoRA adapters: use model.lora.weight_sync=merged")

    # Broadcast weight updates (sdpo/weight_sync/broadcast.py): join the group once, then receive per sync.
    def join_weight_group(self, backend: str, master_addr: str, master_port: int, rank_offset: int, world_size: int) -> None:
        raise NotImplementedError(f"the {self.kind} engine cannot join a weight broadcast group: use rollout.weight_sync=shm")

    def receive_weights(self) -> None:
        raise NotImplementedError(f"the {self.kind} engine cannot join a weight broadcast group: use rollout.weight_sync=shm")

    @property
    def workers(self) -> int:
        """Processes that receive broadcast weights (tensor-parallel ranks); 1 unless sharded."""
        return 1

    # Colocated placement: free GPU memory while the learner trains. No-ops where nothing is held.
    def sleep(self, level: int = 2) -> None:
        """level 1: weights to CPU, KV cache dropped; level 2: both dropped (a sync follows)."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """tags: "weights" then "kv_cache" (the documented order around a weight load); None: all."""

    def close(self) -> None:
        """Release the engine's resources (processes, process groups). Optional to call."""
