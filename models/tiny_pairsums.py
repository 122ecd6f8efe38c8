"""A second embedded model: the tiny Qwen2 warm-started on pair sums (environments/pair_sums.py),
rarely right alone but able to read a judge's feedback, as an instruction-tuned LLM can.

SDPO's edge is claimed for rich feedback: a failed attempt plus text that says what is wrong lets
the feedback-conditioned teacher know which tokens to change. That needs a model that (a) starts
rarely successful (or there would be little to learn) and (b) answers better with feedback in its
context than without. The warm start trains three kinds of examples at once, all through the exact
SDPO teacher templates of ``TeacherContextConfig`` (SPEC 2):

- plain: question -> answer;
- feedback: the question in the reprompt template with the judge's feedback on a synthetic wrong
  attempt (each field wrong with a random probability, by a small or a random amount) -> answer;
- solution: the question in the reprompt template with the correct answer shown -> answer.

Every step mixes 8 plain, 48 feedback and 8 solution examples: reading feedback (copying aligned
fields) forms only when the teacher formats dominate, and the facts the model learns along the way
raise its plain success slowly. The build stops as soon as held-out success at temperature 1 reaches
``TARGET_SUCCESS`` (~5%) with the teacher at ``TARGET_TEACHER`` (how this mix was chosen:
models/README.md). Teacher competence is measured as the SDPO probe does: the model's own failed samples, the environment's
feedback on them, and the model answering from that teacher prompt.

    python -m models.tiny_pairsums [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import random
import time
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

from environments.pair_sums import PairSums, answer, feedback_text, question, split_questions
from models.tiny_arithmetic import _loss_sum
from sdpo.config import TeacherContextConfig
from sdpo.tiny.cache import cli, ensure_built
from sdpo.tiny.model import tiny_model_config
from sdpo.tiny.tokenizer import build_tokenizer, chat_ids

# Bump the suffix whenever anything below changes the weights (recipe, data, task, architecture).
MODEL_NAME = "tiny-pairsums-v1"
FIELDS, REVEAL = 4, 2  # the task the model is built for (environments.pair_sums defaults)

SEED = 0
LR = 1e-3
POOL = {"plain": 4000, "feedback": 8000, "solution": 2000}  # pre-tokenized examples, sampled per step
BATCH = (8, 48, 8)  # (plain, feedback, solution) examples a step
TARGET_SUCCESS = 0.05  # held-out student success at T=1 that ends the build
TARGET_TEACHER = 0.45  # ... with the teacher (feedback in context) at least this good
EVAL_EVERY = 10
EVAL_TASKS = 256
MAX_STEPS = 600
EVAL_SEED = 1234
MAX_NEW_TOKENS = 3 * FIELDS + 2  # the answer, EOS, and slack so that over-long answers fail


def model_config(vocab_size: int):
    """Half the width of tiny-arithmetic (4x fewer FLOPs a token): feedback prompts are ~180 tokens,
    and this keeps the build and the RL runs to minutes on 2 cores. head_dim stays 32 (vLLM-CPU)."""
    return tiny_model_config(vocab_size, hidden_size=64, num_attention_heads=2, intermediate_size=256)


def teacher_text(q: str, *, feedback: str | None = None, solution: str | None = None,
                 templates: TeacherContextConfig | None = None) -> str:
    """The teacher's user message exactly as ``sdpo.teacher_context`` builds it (SPEC 2)."""
    t = templates or TeacherContextConfig()
    return t.reprompt_template.format(
        prompt=q,
        solution=t.solution_template.format(successful_previous_attempt=solution) if solution is not None else "",
        feedback=t.feedback_template.format(feedback_raw=feedback) if feedback is not None else "",
    )


def synthetic_attempt(pairs: list[tuple[int, int]], rng: random.Random) -> str:
    """A wrong attempt like the ones a half-trained model makes: each field wrong with a random
    probability, mostly off by a little; sometimes malformed."""
    expected = [a + b for a, b in pairs]
    if rng.random() < 0.05:
        cut = rng.randrange(len(expected))
        return " ".join(f"{e:02d}" for e in expected[:cut])  # too few fields
    p_wrong = rng.uniform(0.2, 0.9)
    wrong = [rng.random() < p_wrong for _ in expected]
    if not any(wrong):
        wrong[rng.randrange(len(wrong))] = True
    got = []
    for e, w in zip(expected, wrong):
        if not w:
            got.append(e)
        elif rng.random() < 0.6:
            got.append(rng.choice([e + d for d in (-3, -2, -1, 1, 2, 3) if 0 <= e + d <= 18]))
        else:
            got.append(rng.choice([v for v in range(19) if v != e]))
    return " ".join(f"{g:02d}" for g in got)


def _example(tok: PreTrainedTokenizerBase, user: str, target: str) -> tuple[list[int], int]:
    p = chat_ids(tok, [{"role": "user", "content": user}])
    return p + tok.encode(target, add_special_tokens=False) + [tok.eos_token_id], len(p)


def build_pool(tok, rng: random.Random, sizes: dict[str, int] = POOL) -> dict[str, list[tuple[list[int], int]]]:
    train = split_questions("train", FIELDS)
    pool: dict[str, list[tuple[list[int], int]]] = {k: [] for k in sizes}
    for kind, n in sizes.items():
        for _ in range(n):
            pairs = train[rng.randrange(len(train))]
            q, a = question(pairs), answer(pairs)
            if kind == "plain":
                user = q
            elif kind == "solution":
                user = teacher_text(q, solution=a)
            else:
                fb = feedback_text(synthetic_attempt(pairs, rng), [x + y for x, y in pairs], REVEAL)
                user = teacher_text(q, feedback=fb)
            pool[kind].append(_example(tok, user, a))
    return pool


def _batch(examples: list[tuple[list[int], int]], tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 except on the answer and EOS); causal attention never looks
    at the padding that follows the real tokens, so no attention mask is needed."""
    width = max(len(s) for s, _ in examples)
    ids = torch.full((len(examples), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (s, n) in enumerate(examples):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, n : len(s)] = ids[i, n : len(s)]
    return ids, labels


@torch.no_grad()
def sample(model, prompts: list[list[int]], eos_id: int, pad_id: int, temperature: float, seed: int,
           max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """Completions (without EOS), all prompts in one left-padded batch: feedback prompts differ in
    length, and one batch per length (as ``warmstart.sample`` does) is far slower then. Rotary
    attention depends only on distances, so the padding offset changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    step = model(input_ids=ids, attention_mask=mask, use_cache=True)
    for _ in range(max_new_tokens):
        logits = step.logits[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen).squeeze(1)
        for j in (~done).nonzero().flatten().tolist():
            if int(nxt[j]) == eos_id:
                done[j] = True
            else:
                out[j].append(int(nxt[j]))
        if done.all():
            break
        mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
        step = model(input_ids=nxt[:, None], attention_mask=mask, past_key_values=step.past_key_values, use_cache=True)
    return out


def competence(model, tok, tasks, temperature: float = 1.0, seed: int = EVAL_SEED) -> dict[str, float]:
    """Student success alone, and the teacher's success from the feedback on the student's own
    failures (what ``probe/teacher_success`` measures in training, minus sibling solutions)."""
    env = PairSums(fields=FIELDS, reveal=REVEAL)
    was_training = model.training
    model.eval()
    outs = sample(model, [chat_ids(tok, t.messages) for t in tasks], tok.eos_token_id, tok.pad_token_id, temperature, seed)
    verdicts = [env.verify(t, tok.decode(o, skip_special_tokens=True)) for t, o in zip(tasks, outs)]
    failed = [(t, v) for t, v in zip(tasks, verdicts) if v.reward < 0.5]
    teacher = 0.0
    if failed:
        prompts = [chat_ids(tok, [{"role": "user", "content": teacher_text(t.messages[-1]["content"], feedback=v.feedback)}])
                   for t, v in failed]
        answers = sample(model, prompts, tok.eos_token_id, tok.pad_token_id, temperature, seed + 1)
        teacher = sum(env.verify(t, tok.decode(o, skip_special_tokens=True)).reward for (t, _), o in zip(failed, answers)) / len(failed)
    model.train(was_training)
    return {"student": sum(v.reward for v in verdicts) / len(tasks), "teacher_with_feedback": teacher}


def train_feedback_model(seed: int = SEED, max_steps: int = MAX_STEPS, target: float = TARGET_SUCCESS,
                         pool_sizes: dict[str, int] = POOL, eval_tasks: int = EVAL_TASKS,
                         log: Callable[[str], None] = print):
    """Builds and warm-starts the model in memory; returns (model, tokenizer, metrics). The caller's
    RNG state and thread count are left as they were. Small ``pool_sizes``/``max_steps`` give a
    quick (useless) build for tests."""
    threads = torch.get_num_threads()
    # One thread: fixed, so that CPU kernels reduce in the same order on every build, and on a busy
    # 2-core machine two threads spin against other processes (measured 3x slower).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _train(seed, max_steps, target, pool_sizes, eval_tasks, log)
    finally:
        torch.set_num_threads(threads)


def _train(seed, max_steps, target, pool_sizes, eval_tasks, log):
    start = time.perf_counter()
    tok = build_tokenizer()
    model = Qwen2ForCausalLM(model_config(len(tok)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    pool = build_pool(tok, random.Random(seed), pool_sizes)
    tasks = PairSums(fields=FIELDS, reveal=REVEAL).tasks("test")[:eval_tasks]
    gen = torch.Generator().manual_seed(seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[tiny] {MODEL_NAME}: {n_params / 1e6:.2f}M params; pool built in {time.perf_counter() - start:.0f}s")

    history, step, scores = [], 0, {"student": 0.0, "teacher_with_feedback": 0.0}
    while step < max_steps:
        examples = []
        for kind, n in zip(("plain", "feedback", "solution"), BATCH):
            idx = torch.randint(len(pool[kind]), (n,), generator=gen).tolist()
            examples += [pool[kind][i] for i in idx]
        ids, labels = _batch(examples, tok)
        loss_sum, n_tokens = _loss_sum(model, ids, labels)
        loss = loss_sum / n_tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % EVAL_EVERY and step != max_steps:
            continue
        scores = competence(model, tok, tasks)
        history.append({"step": step, "loss": round(loss.item(), 4), **scores})
        log(f"[tiny] step {step}: loss {loss.item():.3f}, student {scores['student']:.3f}, "
            f"teacher with feedback {scores['teacher_with_feedback']:.3f}, {time.perf_counter() - start:.0f}s")
        if scores["student"] >= target and scores["teacher_with_feedback"] >= TARGET_TEACHER:
            break
    model.eval()
    greedy = competence(model, tok, tasks, temperature=0.0)
    metrics = {
        "name": MODEL_NAME, "seed": seed, "steps": step,
        "fields": FIELDS, "reveal": REVEAL,
        "heldout_success_t1": scores["student"], "teacher_with_feedback_t1": scores["teacher_with_feedback"],
        "heldout_success_greedy": greedy["student"], "teacher_with_feedback_greedy": greedy["teacher_with_feedback"],
        "heldout_tasks": len(tasks), "params": n_params, "vocab_size": len(tok),
        "recipe": {"lr": LR, "pool": pool_sizes, "batch": BATCH, "target_success": target, "target_teacher": TARGET_TEACHER,
                   "max_steps": max_steps, "eval_every": EVAL_EVERY, "eval_seed": EVAL_SEED},
        "history": history, "torch_version": torch.__version__,
    }
    if scores["student"] < target or scores["teacher_with_feedback"] < TARGET_TEACHER:
        log(f"[tiny] warning: targets missed after {step} steps: {scores}")
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    return model, tok, metrics


def ensure_feedback_model(cache_dir: str | None = None, log: Callable[[str], None] = print, force: bool = False) -> str:
    """Path of the warm-started pair-sums model (a Hugging Face model directory), built on first use."""
    path, metrics = ensure_built(MODEL_NAME, lambda: train_feedback_model(log=log), cache_dir=cache_dir, force=force,
                                 log=log, expected="a few minutes")
    if metrics is not None:
        log(f"[tiny] saved {path}: held-out success {metrics['heldout_success_t1']:.3f} (T=1), teacher with "
            f"feedback {metrics['teacher_with_feedback_t1']:.3f}; {metrics['steps']} steps, {metrics['seconds']}s")
    return path


def main(argv: list[str] | None = None) -> None:
    cli("python -m models.tiny_pairsums", __doc__.split("\n\n")[0], ensure_feedback_model, argv)


if __name__ == "__main__":
    main()
