"""The learner on a packed episode (SPEC 2a): observation tokens are context only, so an episode's
loss equals the sum of its assistant spans' losses computed separately (each span a sample whose
prompt is everything before it), for every objective; and a loss mask of all ones changes nothing.

One process, no FSDP: the same functions the learner worker calls (response_logits, the worker's
row selection, micro_batch_loss, Totals.of) on a tiny random Qwen2.
"""

from __future__ import annotations

import pytest
import torch

from sdpo.batch import TrainSample
from sdpo.learner.model import load_causal_lm, response_logits
from sdpo.learner.objective import MicroBatch, Scores, Totals, micro_batch_loss
from sdpo.learner.worker import model_token_rows, select_rows
from sdpo.recipe import load_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(learner_model_dir):
    torch.manual_seed(0)
    return load_causal_lm(learner_model_dir, "sdpa")


def tensors(samples):
    """What the worker's ``_tensors`` builds: the model's tokens only."""
    kept = [[t for t, m in zip(s.response_ids, s.loss_mask or [1] * len(s.response_ids)) if m] for s in samples]
    return MicroBatch(sampled=torch.tensor([t for k in kept for t in k]),
                      seq_index=torch.tensor([i for i, k in enumerate(kept) for _ in k]),
                      rollout_logp=torch.tensor([lp for s in samples for lp in s.rollout_logprobs]),
                      sd_mask=torch.tensor([float(s.sd_mask) for s in samples]),
                      advantage=torch.tensor([s.advantage for s in samples]),
                      success=torch.tensor([float(s.success) for s in samples]))


def loss_of(model, cfg, samples, totals, teacher_model=None):
    keep = model_token_rows(samples, CPU)
    responses = [s.response_ids for s in samples]

    def scores(m, prompts):
        return select_rows(Scores(logits=response_logits(m, prompts, responses, CPU)), keep).tempered(cfg.rollout.temperature)

    with torch.no_grad():
        teacher = scores(teacher_model or model, [s.teacher_prompt_ids for s in samples])
    loss, _ = micro_batch_loss(cfg.loss, scores(model, [s.prompt_ids for s in samples]), teacher, tensors(samples), None, totals)
    return loss


def episode_and_spans():
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(4, 100, (n,), generator=g).tolist()  # noqa: E731
    prompt, teacher_prompt = ids(7), ids(12)
    a1, o1, a2, o2, a3 = ids(5), ids(4), ids(6), ids(3), ids(4)
    lp = (-torch.rand(15, generator=g)).tolist()
    episode = TrainSample(prompt, a1 + o1 + a2 + o2 + a3, lp, teacher_prompt, sd_mask=1, advantage=0.7, success=0,
                          loss_mask=[1] * 5 + [0] * 4 + [1] * 6 + [0] * 3 + [1] * 4)
    spans = [TrainSample(prompt, a1, lp[:5], teacher_prompt, 1, 0.7),
             TrainSample(prompt + a1 + o1, a2, lp[5:11], teacher_prompt + a1 + o1, 1, 0.7),
             TrainSample(prompt + a1 + o1 + a2 + o2, a3, lp[11:], teacher_prompt + a1 + o1 + a2 + o2, 1, 0.7)]
    return episode, spans


@pytest.mark.parametrize("objective", ["sdpo", "grpo", "hybrid", "routed"])
def test_episode_loss_is_the_sum_of_its_assistant_spans(model, objective):
    cfg = load_config(None, [f"loss.objective={objective}", "loss.aggregation=token_mean", "rollout.temperature=0.8",
                             "loss.topk=null"])
    episode, spans = episode_and_spans()
    totals = Totals.of([episode])
    assert (totals.all_tokens, totals.sd_tokens) == (15, 15)  # the observation tokens are not counted
    whole = loss_of(model, cfg, [episode], totals)
    parts = sum(loss_of(model, cfg, [s], totals) for s in spans)
    assert whole.item() == pytest.approx(parts.item(), rel=1e-5, abs=1e-7)
    assert whole.item() != 0.0


def test_sequence_mean_counts_only_the_model_tokens_of_an_episode(model):
    """T_i of sequence_mean is the episode's model-token count (15), not its response length (22):
    one episode's sequence mean is then its token mean, i.e. the sum of its spans over 15 tokens."""
    episode, spans = episode_and_spans()
    per_sequence = loss_of(model, load_config(None, ["loss.aggregation=sequence_mean"]), [episode], Totals.of([episode]))
    token_cfg = load_config(None, ["loss.aggregation=token_mean"])
    spans_sum = sum(loss_of(model, token_cfg, [s], Totals.of([episode])) for s in spans)
    assert per_sequence.item() == pytest.approx(spans_sum.item(), rel=1e-5)
    assert len(tensors([episode]).sampled) == 15 == len(episode.rollout_logprobs)


def test_a_mask_of_all_ones_is_bit_identical_to_no_mask(model):
    cfg = load_config(None, ["loss.objective=hybrid"])
    _, spans = episode_and_spans()
    masked = [TrainSample(s.prompt_ids, s.response_ids, s.rollout_logprobs, s.teacher_prompt_ids, s.sd_mask, s.advantage,
                          loss_mask=[1] * len(s.response_ids)) for s in spans]
    assert model_token_rows(spans, CPU) is None
    a = loss_of(model, cfg, spans, Totals.of(spans))
    b = loss_of(model, cfg, masked, Totals.of(masked))
    assert torch.equal(a, b)


def test_real_engine_episodes_align_with_the_learner(tmp_path):
    """Episodes sampled by the HF engine (a random tiny model, many stop ids so turns are short,
    a simulated user answering each turn): build_batch's samples carry the engine's log-prob of
    every model token and of nothing else, and the learner's log-probs at exactly those positions
    (observations in place) agree with them."""
    from environments import Task, Verdict
    from environments.multi_turn import MultiTurnEnvironment
    from sdpo.batch import build_batch
    from sdpo.config import TeacherContextConfig
    from sdpo.episodes import EpisodeLimits, run_episodes
    from sdpo.rollout.base import Sampling
    from sdpo.rollout.hf_engine import HFEngine
    from sdpo.tiny.model import tiny_model_config
    from sdpo.tiny.tokenizer import build_tokenizer
    from tests.conftest import save_tiny_qwen2

    tok = build_tokenizer()
    path = save_tiny_qwen2(tmp_path / "m", tiny_model_config(len(tok)))
    tok.save_pretrained(path)

    class Chatty(MultiTurnEnvironment):
        """A simulated user: answers the first two turns, then judges."""
        def tasks(self, split):
            return [Task(str(i), [{"role": "user", "content": f"q{i}"}]) for i in range(2)]

        def step(self, state, message):
            if state.turn < 3:
                return [{"role": "tool", "content": f"turn {state.turn} seen"}]
            return Verdict(float(len(message["content"]) % 2), "odd")

        def verify(self, task, completion):
            return Verdict(0.0)

    env, engine = Chatty(), HFEngine(path, dtype="float32", seed=0)
    stops = tuple([tok.eos_token_id] + list(range(40, 80)))  # ~15% of the vocabulary: turns of a few tokens
    sampling = Sampling(n=3, temperature=1.0, top_p=1.0, max_new_tokens=200, stop_token_ids=stops, seed=5)
    groups = run_episodes(engine.generate, tok, env, env.tasks("train"), sampling, EpisodeLimits(3, 200, 10.0))
    eps = [e for g in groups for e in g]
    assert all(e.turns == 3 and e.loss_mask.count(0) > 0 for e in eps if e.verdict.info.get("episode_end") is None)
    assert sum(e.turns == 3 for e in eps) >= 3, [(e.turns, e.verdict.info) for e in eps]
    samples, _ = build_batch(env.tasks("train"), [g[0].prompt_ids for g in groups], groups,
                             [[e.verdict for e in g] for g in groups], tok, TeacherContextConfig())
    model = load_causal_lm(path, "sdpa")
    with torch.no_grad():
        keep = model_token_rows(samples, CPU)
        scores = select_rows(Scores(logits=response_logits(model, [s.prompt_ids for s in samples],
                                                           [s.response_ids for s in samples], CPU)), keep)
        learner = scores.token_logprobs(tensors(samples).sampled)
    engine_logp = torch.tensor([lp for s in samples for lp in s.rollout_logprobs])
    assert learner.shape == engine_logp.shape == (sum(s.loss_tokens for s in samples),)
    assert (learner - engine_logp).abs().max().item() < 1e-4
