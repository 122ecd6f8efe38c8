"""A tiny Qwen2 warm-started to call the calculator tool, and to be its own SDPO teacher, built locally.

The task (environments/calculator.py) needs the ``add`` tool: the model must copy both numbers into
a call in its chat template's format, then copy the tool's answer into its final answer. The warm
start is supervised on whole successful episodes, loss on the model's two turns only, never on the
observation, in two phases:

1. Plain episodes until held-out success of real episodes (sdpo/episodes.py, the model sampling
   every turn at temperature 1, as the trainer will) reaches ``TARGET_SUCCESS``: a model that calls
   the tool on nearly every task, well-formed, and gets some of them right, so RL has signal.
2. ``TEACHER_STEPS`` of half plain, half teacher-format episodes: after the teacher prompt SDPO
   builds with ``TEACHER_CONTEXT`` (``episode_demonstration: turns``: a correct episode as earlier
   turns of the chat, then the question again; the recipe sets the same keys), the same correct
   episode. A model copies from an earlier episode of its own form readily; shown the episode as
   text in the user message it never learned to (models/README.md).

Measured (seed 0, 2 shared cores): phase 1 stops at step 450 (held-out T=1: calls 0.95, success
0.45); after phase 2 the student is at ~0.69 and the teacher at ~0.75 (T=1), and teacher-forced on
correct episodes the teacher puts more probability on the copied digits than the student does.

    python -m models.tiny_calculator [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import json
import time
from typing import Callable

import torch
from transformers import Qwen2ForCausalLM

from environments.calculator import Calculator, question, split_pairs
from models.tiny_arithmetic import _loss_sum, sample
from sdpo.chat import chat_ids
from sdpo.config import TeacherContextConfig
from sdpo.episodes import Episode, EpisodeLimits, demonstration_turns, observation_ids, run_episodes
from sdpo.rollout.base import Completion, Sampling
from sdpo.teacher_context import build_teacher_contexts
from sdpo.tiny.cache import cli, ensure_built
from sdpo.tiny.model import tiny_model_config
from sdpo.tiny.tokenizer import build_tokenizer

MODEL_NAME = "tiny-calculator-v3"
SEED = 0
LR = 3e-3  # digits leave chance (14%) at ~200 steps and reach 85% teacher-forced by 400 (seed 0)
BATCH = 32
EVAL_EVERY = 25  # success jumped 0.09 -> 0.45 within 25 steps (seed 0): the stop overshoots the target
EVAL_TASKS = 64
TARGET_SUCCESS = 0.25
MAX_STEPS = 1200
EVAL_SEED = 1234
MAX_EPISODE_TOKENS = 160
TEACHER_STEPS = 100  # teacher-forced digit log-prob passed the student's by step 50-100 (seed 0)
TEACHER_LR = 1e-3
# The teacher prompt of recipes/tools_cpu.yaml (tests/test_episodes.py checks they agree). The
# question is repeated bare: with the default reprompt's closing sentence after it the teacher
# still trailed the student after 150 steps.
TEACHER_CONTEXT = TeacherContextConfig(episode_demonstration="turns", reprompt_template="{prompt}{solution}{feedback}",
                                       include_environment_feedback=False)


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


def _prompt(tok, a: int, b: int, teacher: bool = False) -> list[int]:
    if teacher:
        return teacher_prompt(tok, a, b)
    return chat_ids(tok, [{"role": "user", "content": question(a, b)}], tools=Calculator.tools)


def demonstration_episode(a: int, b: int) -> Episode:
    """A correct episode's messages, as sdpo/episodes.py records them (tool calls parsed)."""
    return Episode([], messages=[{"role": "assistant", "content": "", "raw": call_text(a, b),
                                  "tool_calls": [{"name": "add", "arguments": {"a": a, "b": b}}]},
                                 {"role": "tool", "name": "add", "content": str(a + b)},
                                 {"role": "assistant", "content": str(a + b), "raw": str(a + b)}])


def teacher_prompt(tok, a: int, b: int) -> list[int]:
    """The teacher prompt SDPO builds (sdpo/teacher_context.py, ``TEACHER_CONTEXT``) for a sample of
    this task whose sibling's episode was correct."""
    failed, _ = build_teacher_contexts([{"role": "user", "content": question(a, b)}], ["", ""], [0.0, 1.0], [None, None],
                                       TEACHER_CONTEXT, turns=[[], demonstration_turns(demonstration_episode(a, b))])
    return chat_ids(tok, failed.messages, tools=Calculator.tools)


def _batch(tok, pairs, teacher: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    seqs, labels = [], []
    for a, b in pairs:
        p = _prompt(tok, a, b, teacher)
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


def rates(model, tok, with_demonstration: bool = False, temperature: float = 1.0,
          tasks: int = EVAL_TASKS) -> dict[str, float]:
    """Held-out rates of real episodes: ``success``, and ``calls``: episodes whose first turn is a
    well-formed call of ``add`` with integer ``a`` and ``b``. ``with_demonstration``: after the SDPO
    teacher prompt with a correct episode shown (the teacher's view)."""
    was_training = model.training
    model.eval()
    env = Calculator(limit_per_split=tasks)
    chosen = env.tasks("test")
    prompts = [teacher_prompt(tok, a, b) for a, b in split_pairs("test")[:tasks]] if with_demonstration else None
    sampling = Sampling(n=1, temperature=temperature, top_p=1.0, max_new_tokens=MAX_EPISODE_TOKENS,
                        stop_token_ids=(tok.eos_token_id,), seed=EVAL_SEED)
    groups = run_episodes(_generate(model, tok), tok, env, chosen, sampling, EpisodeLimits(3, MAX_EPISODE_TOKENS, 10.0),
                          prompts)
    model.train(was_training)
    episodes = [g[0] for g in groups]
    calls = [ep.messages[0].get("tool_calls") or [] for ep in episodes]
    well_formed = sum(len(c) == 1 and c[0].get("name") == "add" and sorted(c[0].get("arguments", {})) == ["a", "b"]
                      and all(isinstance(v, int) for v in c[0]["arguments"].values()) for c in calls)
    return {"success": sum(ep.verdict.reward for ep in episodes) / len(episodes), "calls": well_formed / len(episodes)}


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
    history, student, step = [], {"success": 0.0, "calls": 0.0}, 0
    while step < max_steps:
        picks = torch.randint(len(train), (BATCH,), generator=gen).tolist()
        loss_sum, tokens = _loss_sum(model, *_batch(tok, [train[i] for i in picks]))
        loss = loss_sum / tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % EVAL_EVERY and step != max_steps:
            continue
        student = rates(model, tok)
        history.append({"step": step, "loss": round(loss.item(), 4), "heldout_success_t1": student["success"],
                        "heldout_calls_t1": student["calls"]})
        log(f"[tiny] step {step}: loss {loss.item():.3f}, held-out (T=1) well-formed calls {student['calls']:.2f}, "
            f"success {student['success']:.2f}, {time.perf_counter() - start:.0f}s")
        if student["success"] >= TARGET_SUCCESS:
            break
    phase1_steps, teacher = step, None
    # Phase 2: the teacher's view, half of each batch (teacher-format alone wiped out the student's
    # episodes within 25 steps), with a fresh optimizer at a lower rate.
    opt = torch.optim.AdamW(model.parameters(), lr=TEACHER_LR)
    half = BATCH // 2
    for _ in range(TEACHER_STEPS):
        picks = [train[i] for i in torch.randint(len(train), (BATCH,), generator=gen).tolist()]
        plain, taught = _loss_sum(model, *_batch(tok, picks[:half])), _loss_sum(model, *_batch(tok, picks[half:], teacher=True))
        loss = (plain[0] + taught[0]) / (plain[1] + taught[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if (step - phase1_steps) % EVAL_EVERY:
            continue
        student, teacher = rates(model, tok), rates(model, tok, with_demonstration=True)
        history.append({"step": step, "loss": round(loss.item(), 4), "heldout_success_t1": student["success"],
                        "heldout_calls_t1": student["calls"], "with_demonstration_success_t1": teacher["success"]})
        log(f"[tiny] step {step} (teacher phase): loss {loss.item():.3f}, held-out (T=1) success {student['success']:.2f}, "
            f"with a demonstration {teacher['success']:.2f}, {time.perf_counter() - start:.0f}s")
    if teacher is None or (step - phase1_steps) % EVAL_EVERY:  # else the last evaluation above is this one
        teacher = rates(model, tok, with_demonstration=True)
    greedy = rates(model, tok, temperature=0.0)
    log(f"[tiny] with a demonstration (T=1): calls {teacher['calls']:.2f}, success {teacher['success']:.2f}; "
        f"greedy: calls {greedy['calls']:.2f}, success {greedy['success']:.2f}")
    model.eval()
    metrics = {"name": MODEL_NAME, "seed": seed, "steps": step, "student_phase_steps": phase1_steps,
               "heldout_success_t1": student["success"],
               "heldout_calls_t1": student["calls"], "with_demonstration_success_t1": teacher["success"],
               "with_demonstration_calls_t1": teacher["calls"], "heldout_success_greedy": greedy["success"],
               "heldout_calls_greedy": greedy["calls"], "eval_tasks": EVAL_TASKS, "history": history,
               "recipe": {"lr": LR, "batch": BATCH, "target_success": TARGET_SUCCESS, "max_steps": max_steps,
                          "teacher_steps": TEACHER_STEPS, "teacher_lr": TEACHER_LR,
                          "teacher_context": TEACHER_CONTEXT.model_dump()},
               "torch_version": torch.__version__, "seconds": round(time.perf_counter() - start, 1)}
    return model, tok, metrics


def ensure_tiny_calculator(cache_dir: str | None = None, log: Callable[[str], None] = print, force: bool = False) -> str:
    path, metrics = ensure_built(MODEL_NAME, lambda: train_tiny_model(log=log), cache_dir=cache_dir, force=force,
                                 log=log, expected="a few minutes")
    if metrics is not None:
        log(f"[tiny] saved {path}: held-out (T=1) calls {metrics['heldout_calls_t1']:.2f}, success "
            f"{metrics['heldout_success_t1']:.2f}, {metrics['with_demonstration_success_t1']:.2f} with a demonstration; "
            f"{metrics['steps']} steps, {metrics['seconds']}s")
    return path


def main(argv: list[str] | None = None) -> None:
    cli("python -m models.tiny_calculator", __doc__.split("\n\n")[0], ensure_tiny_calculator, argv)


if __name__ == "__main__":
    main()
