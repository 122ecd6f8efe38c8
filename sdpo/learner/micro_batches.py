"""How one step's samples become each learner rank's micro-batches: balanced over ranks, either a
fixed number of samples each (padded) or a token budget each (packed). Pure functions (no Ray, no
torch), so the driver, the tests and the benchmarks plan alike."""

from __future__ import annotations

from sdpo.batch import TrainSample
from sdpo.config import Config
from sdpo.dealing import snake_deal


def balance(samples: list[TrainSample], ranks: int) -> list[list[TrainSample]]:
    """Equal sample counts per rank (FSDP needs every rank to run the same number of forwards),
    with token counts evened out by dealing the longest samples first in snake order."""
    return snake_deal(sorted(samples, key=lambda s: -s.num_tokens), ranks)  # sorted() is stable: ties keep input order


def rank_plans(samples: list[TrainSample], ranks: int, cfg: Config) -> list[list[list[TrainSample]]]:
    """Each rank's micro-batches for one step of ``samples``.

    Pure distillation: a sample without a teacher signal adds exactly 0 to the loss and its
    gradient, so its two forwards are skipped (the loss normalizers still count it). Not with an
    entropy quantile, whose threshold is taken over every token of the batch."""
    loss, learner = cfg.loss, cfg.learner
    if loss.objective == "sdpo" and loss.top_entropy_quantile == 1.0:
        samples = samples_to_train(samples, ranks)
    return plan_micro_batches(samples, ranks, learner.samples_per_micro_batch, learner.max_tokens_per_micro_batch)


def samples_to_train(samples: list[TrainSample], ranks: int) -> list[TrainSample]:
    """The samples with a teacher signal, topped up with the shortest signal-less ones to a
    non-zero multiple of ``ranks`` (every rank must run a forward: a step of zero gradients is
    still an AdamW step, which differs from no gradients at all)."""
    keep = [s for s in samples if s.sd_mask]
    rest = sorted((s for s in samples if not s.sd_mask), key=lambda s: s.num_tokens)
    while (len(keep) % ranks or not keep) and rest:
        keep.append(rest.pop(0))
    return keep


def plan_micro_batches(samples: list[TrainSample], ranks: int, samples_per_micro_batch: int,
                       max_tokens_per_micro_batch: int | None) -> list[list[list[TrainSample]]]:
    """Each rank's micro-batches. Every rank gets the same number (FSDP's gathers and reductions
    are collectives: a rank with one forward fewer would leave the others waiting forever)."""
    if len(samples) % ranks:
        raise ValueError(f"{len(samples)} samples cannot be split evenly over {ranks} learner ranks")
    if max_tokens_per_micro_batch is None:
        size = samples_per_micro_batch
        return [[shard[i : i + size] for i in range(0, len(shard), size)] for shard in balance(samples, ranks)]
    return token_budget_micro_batches(samples, ranks, max_tokens_per_micro_batch)


def packed_length(sample: TrainSample) -> int:
    """A sample's share of the longer of its micro-batch's two packed rows (student or teacher)."""
    return max(len(sample.prompt_ids), len(sample.teacher_prompt_ids)) + len(sample.response_ids)


def token_budget_micro_batches(samples: list[TrainSample], ranks: int, budget_tokens: int) -> list[list[list[TrainSample]]]:
    """Micro-batches of at most ``budget_tokens`` packed tokens (a longer sample runs alone), as few
    as fit, their count a multiple of ``ranks``, and their loads as even as the samples allow, so
    that ranks finish together."""
    order = sorted(samples, key=packed_length, reverse=True)
    count = -(-_first_fit_count(order, budget_tokens) // ranks) * ranks
    while (bins := _fill_least_loaded(order, count, budget_tokens)) is None:
        count += ranks  # never past one sample per bin: that always fits
    bins.sort(key=lambda b: -sum(map(packed_length, b)))
    return snake_deal(bins, ranks)  # rank loads stay even


def _first_fit_count(order: list[TrainSample], budget: int) -> int:
    loads: list[int] = []
    for sample in order:
        length = packed_length(sample)
        for i, load in enumerate(loads):
            if load + length <= budget:
                loads[i] += length
                break
        else:
            loads.append(length)
    return len(loads)


def _fill_least_loaded(order: list[TrainSample], count: int, budget: int) -> list[list[TrainSample]] | None:
    """Longest first into the least-loaded bin it fits (an oversize sample only into an empty bin);
    None when some sample fits nowhere."""
    bins: list[list[TrainSample]] = [[] for _ in range(count)]
    loads = [0] * count
    for sample in order:
        length = packed_length(sample)
        fits = [i for i in range(count) if loads[i] + length <= budget or loads[i] == 0]
        if not fits:
            return None
        best = min(fits, key=loads.__getitem__)
        bins[best].append(sample)
        loads[best] += length
    # No bin stays empty: count <= len(order), and each of the first `count` samples opens one.
    return bins
