"""Defaults that fit the model and the machine: how many learner ranks, and packed micro-batches on CPU.

A key the user set (in the recipe or an override) is never touched; a key left at its default is
chosen here from the model's parameter count and the device, and each choice comes with a reason
that `--dry-run` and the run's first lines print.

- GPU, separate (not colocated) placement, model under `SINGLE_RANK_MAX_PARAMS`: one rank. Its training state (fp32 weights, gradients,
  AdamW moments and the teacher: ~20 bytes a parameter, 2 GB at 100M) fits one GPU many times
  over, so a second rank would only add a GPU, NCCL gathers and reduce-scatters per layer, and a
  gather before every weight push. (Not yet measured on a GPU.)
- CPU: the default 2 ranks of 1 thread are kept, even at 0.6M parameters. Measured end to end on
  the quickstart (benchmarks/RESULTS.md, "End to end"): 2 ranks x 1 thread learned in 0.315 s,
  1 rank x 1 thread in 0.434 s (the learner is compute-bound even there: ~11k teacher and ~3k
  student tokens a step), and 1 rank x 2 threads was 7x slower on the loaded shared machine (OpenMP
  threads wait on each other when one is descheduled; two processes do not).
- CPU with the default attention: packed micro-batches of `CPU_PACKED_TOKENS` tokens instead of
  padded ones of `learner.samples_per_micro_batch` samples, so each prompt is computed once for all
  its samples (learner.share_prompts). Measured on the quickstart: learn 0.146 s packed and shared
  against 0.391 s padded (benchmarks/RESULTS.md, "Shared-prefix packing"). On GPU the padded default
  stays until packing's memory per micro-batch is measured there.
"""

from __future__ import annotations

import json
import os

from sdpo.config import Config

SINGLE_RANK_MAX_PARAMS = 100_000_000
CPU_PACKED_TOKENS = 8192  # the quickstart's budget: its 8 x 16 samples fit one micro-batch per rank
# The embedded models' sizes, for a dry run before they are built (sdpo/tiny builds them on first use).
# tiny-pairsums is smaller still (hidden 64); an upper bound is all the choice below needs.
EMBEDDED_PARAMS = {"tiny-arithmetic": 592_256, "tiny-pairsums": 592_256}


def count_params(model_path: str) -> int | None:
    """Parameters of a Qwen2/Llama-style model from its config.json (no weights read); None when
    the path is not a local model folder (a hub name) or the config lacks the usual fields."""
    if model_path in EMBEDDED_PARAMS:
        return EMBEDDED_PARAMS[model_path]
    config_file = os.path.join(os.path.expanduser(model_path), "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        c = json.load(f)
    try:
        h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    except KeyError:
        return None
    heads = c.get("num_attention_heads", 1)
    head_dim = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads", heads) * head_dim
    attention = h * heads * head_dim * 2 + h * kv * 2 + (heads * head_dim + 2 * kv)  # q, o, k, v (+ qkv biases)
    per_layer = attention + 3 * h * inter + 2 * h  # + MLP and two norms
    head = 0 if c.get("tie_word_embeddings", False) else vocab * h
    return vocab * h + layers * per_layer + h + head


def fit_to_model(cfg: Config, model_path: str | None = None) -> tuple[Config, list[str]]:
    """``cfg`` with the keys the user left unset chosen for this model and machine, and one
    sentence per choice saying why."""
    learner = cfg.learner
    chosen: dict[str, object] = {}
    reasons: list[str] = []
    params = count_params(model_path or cfg.model.path)
    if "world_size" not in learner.model_fields_set and params is not None:
        # colocated: learner rank i shares GPU i with rollout replica i, so the rank count is the layout
        if cfg.device == "cuda" and cfg.rollout.placement != "colocated" and params < SINGLE_RANK_MAX_PARAMS:
            chosen["world_size"] = 1
            reasons.append(f"learner.world_size=1: the model has {params / 1e6:.2f}M parameters (< "
                           f"{SINGLE_RANK_MAX_PARAMS / 1e6:.0f}M), so one GPU holds its training state and a second "
                           "rank would only add NCCL collectives; set learner.world_size to shard it")
        elif cfg.device == "cpu":
            reasons.append(f"learner.world_size={learner.world_size} (default kept): on CPU each rank is one core of "
                           f"compute at 1 thread, and the learner is compute-bound even at {params / 1e6:.2f}M "
                           "parameters; set learner.world_size to change it")
    if ("max_tokens_per_micro_batch" not in learner.model_fields_set and cfg.device == "cpu"
            and cfg.model.attn_implementation == "auto"):
        chosen["max_tokens_per_micro_batch"] = CPU_PACKED_TOKENS
        reasons.append(f"learner.max_tokens_per_micro_batch={CPU_PACKED_TOKENS}: on CPU, packed rows without padding "
                       "compute each prompt once for all its samples (2.7x faster learning on the quickstart); set it, "
                       "or null for padded micro-batches of learner.samples_per_micro_batch")
    from sdpo.learner.micro_batches import shares_prompts

    fitted = cfg
    if chosen:
        # model_copy keeps model_fields_set; the chosen keys join it, so a second pass changes nothing.
        fitted = cfg.model_copy(update={"learner": learner.model_copy(update=chosen)})
        fitted.learner.model_fields_set.update(chosen)
        type(cfg).model_validate(fitted.model_dump())  # the chosen sizes must pass the config's own checks
    _, not_shared = shares_prompts(fitted)
    if not_shared:
        reasons.append(not_shared)
    return fitted, reasons
