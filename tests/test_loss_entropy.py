"""top_entropy_quantile: one threshold for the whole batch, applied per micro-batch and per rank."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_ports
from sdpo.loss import (
    aggregate,
    entropy_threshold,
    gather_entropy_threshold,
    token_entropy,
    top_entropy_mask,
)


def test_token_entropy_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 1e-30, 1e-30]], dtype=torch.float64))
    assert token_entropy(logits).tolist() == pytest.approx([1.5 * math.log(2), 0.0], abs=1e-12)
    uniform = torch.zeros(2, 7, dtype=torch.bfloat16)
    out = token_entropy(uniform)
    assert out.dtype == torch.float32 and out.tolist() == pytest.approx([math.log(7)] * 2, abs=1e-6)


ENT = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])


@pytest.mark.parametrize(
    "q,kept",
    [
        (1.0, 10),
        (0.2, 2),  # position 0.8 * 9 = 7.2: threshold 0.82, keeps 0.9 and 1.0
        (0.5, 5),  # position 4.5: threshold 0.55
        (0.05, 1),  # position 8.55: threshold 0.955, keeps only the maximum
        (0.95, 9),  # position 0.45: threshold 0.145, drops only 0.1
    ],
)
def test_threshold_and_mask_by_hand(q, kept):
    thr = entropy_threshold(ENT, q)
    if q == 1.0:
        assert thr == float("-inf")
    else:
        assert thr == pytest.approx(float(torch.quantile(ENT.double(), 1 - q)), abs=1e-12)
    # The kept tokens are the highest-entropy ones.
    assert top_entropy_mask(ENT, thr).tolist() == [0.0] * (10 - kept) + [1.0] * kept


def test_threshold_matches_torch_quantile_on_random_data():
    g = torch.Generator().manual_seed(0)
    ent = torch.rand(1001, generator=g) * 5
    for q in (0.01, 0.2, 0.37, 0.8, 0.999):
        assert entropy_threshold(ent, q) == pytest.approx(float(torch.quantile(ent.double(), 1 - q)), abs=1e-9)


def test_threshold_edge_cases():
    assert entropy_threshold(torch.tensor([]), 0.5) == float("inf")
    assert entropy_threshold(torch.tensor([2.0]), 0.3) == 2.0
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        entropy_threshold(ENT, 0.0)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        entropy_threshold(ENT, 1.5)


def test_gather_without_process_group_is_local():
    assert not dist.is_initialized()
    assert gather_entropy_threshold(ENT, 0.3) == entropy_threshold(ENT, 0.3)


def test_mask_per_micro_batch_equals_full_batch_rule():
    # The learner's recipe: entropies per micro-batch, one global threshold, mask per micro-batch.
    # The summed aggregate equals the whole-batch one with the whole-batch mask.
    g = torch.Generator().manual_seed(1)
    lengths = [4, 2, 5, 3, 1, 6]
    n = sum(lengths)
    logits = torch.randn(n, 9, dtype=torch.float64, generator=g) * 2
    loss = torch.rand(n, dtype=torch.float64, generator=g)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    sd = torch.ones(len(lengths))
    q = 0.3
    kw = dict(mode="sequence_mean", total_sequences=len(lengths), total_tokens=n)

    whole_ent = token_entropy(logits)
    whole_mask = top_entropy_mask(whole_ent, entropy_threshold(whole_ent, q))
    assert int(whole_mask.sum()) == math.ceil(q * n) or int(whole_mask.sum()) == math.floor(q * n) + 1
    whole = aggregate(loss, whole_mask, seq, sd, **kw)

    bounds = [0, 3, 6]  # micro-batches of sequences [0, 3), [3, 6)
    starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    micro_ents = [token_entropy(logits[starts[a] : starts[b]]) for a, b in zip(bounds, bounds[1:])]
    thr = gather_entropy_threshold(torch.cat(micro_ents), q)
    total = 0.0
    for (a, b), ent in zip(zip(bounds, bounds[1:]), micro_ents):
        rows = slice(starts[a], starts[b])
        total += float(aggregate(loss[rows], top_entropy_mask(ent, thr), seq[rows] - a, sd[a:b], **kw))
    assert total == pytest.approx(float(whole), abs=1e-12)
    # A per-micro-batch threshold would not agree: the rule really is global.
    local = sum(
        float(aggregate(loss[starts[a] : starts[b]], top_entropy_mask(e, entropy_threshold(e, q)), seq[starts[a] : starts[b]] - a,
                        sd[a:b], **kw))
        for (a, b), e in zip(zip(bounds, bounds[1:]), micro_ents)
    )
    assert local != pytest.approx(float(whole), abs=1e-6)


def _rank_main(rank, world, port, shards, q, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = gather_entropy_threshold(shards[rank], q)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_across_real_gloo_ranks_with_uneven_counts():
    g = torch.Generator().manual_seed(2)
    shards = [torch.rand(7, generator=g), torch.rand(12, generator=g)]
    q = 0.25
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(2, free_ports(1)[0], shards, q, out), nprocs=2, join=True)
        results = dict(out)
    expected = entropy_threshold(torch.cat(shards), q)
    assert results[0] == pytest.approx(expected, abs=1e-7) and results[1] == pytest.approx(expected, abs=1e-7)
