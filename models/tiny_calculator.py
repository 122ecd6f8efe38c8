"""A tiny Qwen2 warm-started to call the calculator tool sometimes, built locally.

The task (environments/calculator.py) needs the ``add`` tool: the model must copy both numbers into
a call in its chat template's format, then copy the tool's answer into its final answer. The warm
start is supervised on whole successful episodes (loss on the model's two turns only, never on the
observation), half of them after the SDPO teacher prompt with a successful sibling's final answer
shown (``teacher_context.episode_demonstration: final_answer``, as recipes/tools_cpu.yaml sets it), so
the teacher does better with a demonstration than the student does alone; the whole-episode
transcript would double every sequence, too dear for a CPU warm start. It stops as soon as
held-out success at temperature 1 reaches ``TARGET_SUCCESS`` and the teacher-format success reaches
``TARGET_WITH_SOLUTION``. Success is measured by running real episodes (sdpo/episodes.py) with the
model sampling every turn, exactly as the trainer will.

Status: unproven. One trial build (2 busy cores, ~10 s a step) reached loss 0.44 -> 0.33 in 150
steps with held-out success still 0.00 and was stopped; the step count, learning rate and batch
that reach the targets are not yet known.

    python -m models.tiny_calculator [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import json
import time
from typing import Callable

import torch
from transformers import Qwen2ForCausalLM

from environments.calculator import Calculator, split_pairs
from models.tiny_arithmetic import _loss_sum, sample, teacher_user_text
from sdpo.chat import chat_ids
from sdpo.episodes import EpisodeLimits, observation_ids, run_episodes
from sdpo.rollout.base import Completion, Sampling
from sdpo.tiny.cache import cli, ensure_built
from sdpo.tiny.model import tiny_model_config
from sdpo.tiny.tokenizer import build_tokenizer

MODEL_NAME = "tiny-calculator-v1"
SEED = 0
LR = 2e-3
BATCH = 16  # plain episodes and teacher-format episodes, each, per step
EVAL_EVERY = 50
EVAL_TASKS = 50
TARGET_SUCCESS = 0.25
TARGET_WITH_SOLUTION = 0.7
MAX_STEPS = 600
EVAL_SEED = 1234
MAX_EPISODE_TOKENS = 160


def call_text(a: int, b: int) -> str:
    """The first turn as the chat template writes a call (checked in tests/test_tiny_calculator.py)."""
    return '<tool_call>\n{"name": "add", "arguments": %s}\n</tool_call>' % json.dumps({"a": a, "b": b})


def _episode(tok, a: int, b: int) -> tuple[list[int], list[int]]:
    """The ids of a successful episode's response and its loss mask."""
    eos, env = tok.eos_token_id, Calculator()
    turn1 = tok.encode(call_text(a, b), add_special_tokens=False) + [eos]
    obs = observation_ids(tok, [{"role": "tool", "name": "add", "content": str(a + b)}], env.tools, {eos})
    turn2 = tok.encode(str(a + b), add_special_tokens=False) + [eos]
    return turn1 + obs + turn2, [1] * len(turn1) + [0] * len(obs) + [1] * len(turn2)


def _prompt(tok, a: int, b: int, with_solution: bool) -> list[int]:
    q = f"{a}+{b}"
    text = teacher_user_text(q, str(a + b)) if with_solution else q
    return chat_ids(tok, [{"role": "user", "content": text}], tools=Calculator.tools)


def _batch(tok, pairs, with_solution: bool) -> tuple[torch.Tensor, torch.Tensor]:
    seqs, labels = [], []
    for a, b in pairs:
        p = _prompt(tok, a, b, with_solution)
        r, mask = _episode(tok, a, b)
        seqs.append(p + r)
        labels.append([-100] * len(p) + [t if m else -100 for t, m in zip(r, mask)])
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(l)] = torch.tensor(s), torch.tensor(l)
    return ids, lab


def _generate(model, tok):
    """A ``generate`` for run_episodes on the model in this process (log-probs are not needed)."""
    def generate(prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        flat = [p for p in prompts for _ in range(sampling.n)]
        outs = sample(model, flat, tok.eos_token_id, sampling.temperature, sampling.seed, sampling.max_new_tokens)
        comps = [Completion(o + ([tok.eos_token_id] if len(o) < sampling.max_new_tokens else []),
                            [0.0] * (len(o) + 1), "stop" if len(o) < sampling.max_new_tokens else "length") for o in outs]
        return [comps[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]
    return generate


def success_rate(model, tok, with_solution: bool = False, temperature: float = 1.0, tasks: int = EVAL_TASKS) -> float:
    """Held-out success of real episodes; ``with_solution``: after the teacher prompt with the
    final answer shown (the teacher's view)."""
    was_training = model.training
    model.eval()
    env = Calculator(limit_per_split=tasks)
    chosen = env.tasks("test")
    if with_solution:
        for t, (a, b) in zip(chosen, split_pairs("test")):
            t.messages = [{"role": "user", "content": teacher_user_text(f"{a}+{b}", str(a + b))}]
    sampling = Sampling(n=1, temperature=temperature, top_p=1.0, max_new_tokens=MAX_EPISODE_TOKENS,
                        stop_token_ids=(tok.eos_token_id,), seed=EVAL_SEED)
    groups = run_episodes(_generate(model, tok), tok, env, chosen, sampling, EpisodeLimits(3, MAX_EPISODE_TOKENS, 10.0))
    model.train(was_training)
    return sum(g[0].verdict.reward for g in groups) / len(groups)


def train_tiny_model(seed: int = SEED, max_steps: int = MAX_STEPS, log: Callable[[str], None] = print):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _train(seed, max_steps, log)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, max_steps: int, log):
    start = time.perf_counter()
    tok = build_tokenizer()
    model = Qwen2ForCausalLM(tiny_model_config(len(tok)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    train = split_pairs("train")
    gen = torch.Generator().manual_seed(seed)
    history, success, with_solution, step = [], 0.0, 0.0, 0
    while step < max_steps:
        picks = torch.randint(len(train), (2 * BATCH,), generator=gen).tolist()
        lp, np_ = _loss_sum(model, *_batch(tok, [train[i] for i in picks[:BATCH]], False))
        lt, nt = _loss_sum(model, *_batch(tok, [train[i] for i in picks[BATCH:]], True))
        loss = (lp + lt) / (np_ + nt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % EVAL_EVERY and step != max_steps:
            continue
        success = success_rate(model, tok)
        with_solution = success_rate(model, tok, with_solution=True) if success >= TARGET_SUCCESS else with_solution
        history.append({"step": step, "loss": round(loss.item(), 4), "heldout_success_t1": success,
                        "with_solution_success_t1": with_solution})
        log(f"[tiny] step {step}: loss {loss.item():.3f}, held-out success {success:.2f}, with a demonstration "
            f"{with_solution:.2f}, {time.perf_counter() - start:.0f}s")
        if success >= TARGET_SUCCESS and with_solution >= TARGET_WITH_SOLUTION:
            break
    model.eval()
    metrics = {"name": MODEL_NAME, "seed": seed, "steps": step, "heldout_success_t1": success,
               "with_solution_success_t1": with_solution, "eval_tasks": EVAL_TASKS, "history": history,
               "recipe": {"lr": LR, "batch": BATCH, "target_success": TARGET_SUCCESS,
                          "target_with_solution": TARGET_WITH_SOLUTION, "max_steps": max_steps},
               "torch_version": torch.__version__, "seconds": round(time.perf_counter() - start, 1)}
    return model, tok, metrics


def ensure_tiny_calculator(cache_dir: str | None = None, log: Callable[[str], None] = print, force: bool = False) -> str:
    path, metrics = ensure_built(MODEL_NAME, lambda: train_tiny_model(log=log), cache_dir=cache_dir, force=force,
                                 log=log, expected="a few minutes")
    if metrics is not None:
        log(f"[tiny] saved {path}: held-out success {metrics['heldout_success_t1']:.2f} (T=1), "
            f"{metrics['with_solution_success_t1']:.2f} with a demonstration; {metrics['steps']} steps, {metrics['seconds']}s")
    return path


def main(argv: list[str] | None = None) -> None:
    cli("python -m models.tiny_calculator", __doc__.split("\n\n")[0], ensure_tiny_calculator, argv)


if __name__ == "__main__":
    main()
