"""How one step's samples become each learner rank's micro-batches: balanced over ranks, either a
fixed number of samples each (padded) or a token budget each (packed). Pure functions (no Ray, no
torch), so the driver, the tests and the benchmarks plan alike.

With shared prompts (``learner.share_prompts``, see sdpo/learner/packing.py) the packed planner
keeps the samples of one prompt together where the budget allows and counts a prompt once per
micro-batch, as the packed row will hold it."""

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
    return plan_micro_batches(samples, ranks, learner.samples_per_micro_batch, learner.max_tokens_per_micro_batch,
                              share_prompts=shares_prompts(cfg)[0])


def shares_prompts(cfg: Config) -> tuple[bool, str | None]:
    """Whether the learner packs identical prompts once (driver and learner ranks decide alike: the
    plan's token budget counts what the rows will hold), and, when the user's setting cannot be
    honoured, why. Only the packed rows of ``sdpa_packed`` attention implement the shared prefix;
    flash-attn's varlen call (and transformers' sdpa/eager masks) would see the spans of unshared
    packing, so those keep one copy of the prompt per sample rather than attend wrongly."""
    learner, attention = cfg.learner, cfg.model.attn_implementation
    if not learner.share_prompts or learner.max_tokens_per_micro_batch is None:
        return False, None  # padded micro-batches: one row per sample, nothing to share
    may_be_flash = attention == "flash_attention_2" or (attention == "auto" and cfg.device == "cuda"
                                                          and learner.mixed_precision == "bf16")
    if attention not in ("auto", "sdpa_packed") or may_be_flash:
        shown = "auto (flash-attn on CUDA under bf16)" if attention == "auto" else attention
        return False, (f"learner.share_prompts: off with model.attn_implementation={shown}: only sdpa_packed "
                       "implements the shared-prefix attention, so each sample keeps its own copy of its prompt "
                       "(set model.attn_implementation=sdpa_packed to share prompts)")
    return True, None


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
                       max_tokens_per_micro_batch: int | None, share_prompts: bool = False) -> list[list[list[TrainSample]]]:
    """Each rank's micro-batches. Every rank gets the same number (FSDP's gathers and reductions
    are collectives: a rank with one forward fewer would leave the others waiting forever)."""
    if len(samples) % ranks:
        raise ValueError(f"{len(samples)} samples cannot be split evenly over {ranks} learner ranks")
    if max_tokens_per_micro_batch is None:
        size = samples_per_micro_batch
        return [[shard[i : i + size] for i in range(0, len(shard), size)] for shard in balance(samples, ranks)]
    if share_prompts:
        return shared_budget_micro_batches(samples, ranks, max_tokens_per_micro_batch)
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


def _first_fit_count(order: list, budget: int, cost=packed_length) -> int:
    loads: list[int] = []
    for sample in order:
        length = cost(sample)
        for i, load in enumerate(loads):
            if load + length <= budget:
                loads[i] += length
                break
        else:
            loads.append(length)
    return len(loads)


def _fill_least_loaded(order: list, count: int, budget: int, cost=packed_length) -> list[list] | None:
    """Longest first into the least-loaded bin it fits (an oversize sample only into an empty bin);
    None when some sample fits nowhere. ``order``: samples, or pieces of samples with their ``cost``
    (a bin's load is the sum of its pieces' costs: an upper bound where pieces share a prompt)."""
    bins: list[list] = [[] for _ in range(count)]
    loads = [0] * count
    for sample in order:
        length = cost(sample)
        fits = [i for i in range(count) if loads[i] + length <= budget or loads[i] == 0]
        if not fits:
            return None
        best = min(fits, key=loads.__getitem__)
        bins[best].append(sample)
        loads[best] += length
    # No bin stays empty: count <= len(order), and each of the first `count` samples opens one.
    return bins


def shared_packed_length(samples: list[TrainSample]) -> int:
    """The longer of the two packed rows (student, teacher) of ``samples`` when identical prompts
    are packed once."""
    responses = sum(len(s.response_ids) for s in samples)
    student = sum(map(len, {tuple(s.prompt_ids) for s in samples}))
    teacher = sum(map(len, {tuple(s.teacher_prompt_ids) for s in samples}))
    return max(student, teacher) + responses


def shared_budget_micro_batches(samples: list[TrainSample], ranks: int, budget_tokens: int) -> list[list[list[TrainSample]]]:
    """``token_budget_micro_batches`` over groups of samples that share a prompt instead of single
    samples: a group stays in one micro-batch unless it alone exceeds the budget (then it is cut
    into pieces that fit, siblings with the same teacher prompt side by side), or unless there are
    fewer groups than micro-batches (then the largest pieces are halved)."""
    groups: dict[tuple[int, ...], list[TrainSample]] = {}
    for sample in samples:
        groups.setdefault(tuple(sample.prompt_ids), []).append(sample)
    pieces = [piece for group in groups.values() for piece in _cut_to_budget(group, budget_tokens)]
    order = sorted(pieces, key=shared_packed_length, reverse=True)
    count = -(-_first_fit_count(order, budget_tokens, shared_packed_length) // ranks) * ranks
    while True:
        while len(order) < count:  # every micro-batch needs a sample: split the largest splittable piece
            largest = max((p for p in order if len(p) > 1), key=shared_packed_length)
            order.remove(largest)
            order += [largest[: len(largest) // 2], largest[len(largest) // 2 :]]
            order.sort(key=shared_packed_length, reverse=True)
        if (bins := _fill_least_loaded(order, count, budget_tokens, shared_packed_length)) is not None:
            break
        count += ranks
    micros = [[s for piece in b for s in piece] for b in bins]
    micros.sort(key=lambda m: -shared_packed_length(m))
    return snake_deal(micros, ranks)


def _cut_to_budget(group: list[TrainSample], budget: int) -> list[list[TrainSample]]:
    if shared_packed_length(group) <= budget:
        return [group]
    ordered = sorted(group, key=lambda s: s.teacher_prompt_ids)  # same teacher prompt: adjacent, so kept together
    pieces: list[list[TrainSample]] = [[]]
    for sample in ordered:
        if pieces[-1] and shared_packed_length(pieces[-1] + [sample]) > budget:
            pieces.append([])
        pieces[-1].append(sample)  # a sample over the budget on its own runs alone
    return pieces
