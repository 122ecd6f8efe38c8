"""The embedded default model: a tiny Qwen2 warm-started on 2-digit addition, built locally.

RL needs a policy that already succeeds sometimes (or every group is all-failure and there is
nothing to learn from), and SDPO needs a teacher that does better with a correct answer in its
context. So the warm start trains on two kinds of examples at once: plain question -> answer, and the
question inside the SDPO teacher prompt with the correct answer shown (target: the same answer).
It stops as soon as held-out success at temperature 1 reaches ``TARGET_SUCCESS`` and success with the
answer shown reaches ``TARGET_WITH_SOLUTION``, leaving the student room to improve under RL.

Two phases, because a teacher-format example can be solved by adding as well as by copying the
shown answer, and whichever skill forms first wins: phase 1 (64 plain + 128 teacher-format examples
a step) runs until copying works, phase 2 (128 + 64) keeps it while adding forms. The measurements
behind these choices are in models/README.md.

    python -m models.tiny_arithmetic [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

from environments.arithmetic import question, split_pairs
from sdpo.config import TeacherContextConfig
from sdpo.tiny.cache import cli, ensure_built
from sdpo.tiny.model import tiny_model_config
from sdpo.tiny.tokenizer import build_tokenizer, chat_ids

# Bump the suffix whenever anything below changes the weights (recipe, data, architecture).
MODEL_NAME = "tiny-arithmetic-v2"

SEED = 0
LR = 7e-4  # 2e-3 learns copying as fast but adding far less reliably (seed 1: 0.07 after 400 steps)
# (plain, teacher-format) examples a step; see the module docstring.
PHASE1_BATCH, PHASE2_BATCH = (64, 128), (128, 64)
PHASE1_WITH_SOLUTION = 0.8  # copying works: move to phase 2
# Phase 1 checks copying (~0.5 s an evaluation); phase 2 checks the student (~0.2 s) often, since its
# success can jump 0.14 -> 0.46 within 25 steps.
EVAL_EVERY = {1: 25, 2: 10}
TARGET_SUCCESS = 0.2
TARGET_WITH_SOLUTION = 0.85
MAX_STEPS = 360  # expected stop at ~275-350 steps (~2-2.5 min on 2 idle cores)
EVAL_SEED = 1234  # sampling seed of every evaluation, so the stopping point is deterministic
MAX_NEW_TOKENS = 6  # 3 digits + EOS, plus slack so that over-long answers are counted as failures


def teacher_user_text(q: str, solution: str, templates: TeacherContextConfig | None = None) -> str:
    """The user message of the SDPO teacher prompt with a demonstration and no feedback (SPEC 2)."""
    t = templates or TeacherContextConfig()
    return t.reprompt_template.format(
        prompt=q, solution=t.solution_template.format(successful_previous_attempt=solution), feedback=""
    )


def _prompt_ids(tok: PreTrainedTokenizerBase, a: int, b: int, with_solution: bool) -> list[int]:
    q = question(a, b)
    text = teacher_user_text(q, str(a + b)) if with_solution else q
    return chat_ids(tok, [{"role": "user", "content": text}])


def _examples(tok, pairs, with_solution: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (-100 except on the answer and its EOS). No attention
    mask is needed: padding only follows the real tokens, which causal attention never looks ahead to."""
    seqs, n_prompt = [], []
    for a, b in pairs:
        p = _prompt_ids(tok, a, b, with_solution)
        seqs.append(p + tok.encode(str(a + b), add_special_tokens=False) + [tok.eos_token_id])
        n_prompt.append(len(p))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, n_prompt)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, n : len(s)] = ids[i, n : len(s)]
    return ids, labels


def _loss_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


@torch.no_grad()
def sample(model, prompts: list[list[int]], eos_id: int, temperature: float = 1.0,
           seed: int = EVAL_SEED, max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """Completions (without EOS) of each prompt; temperature 0 is greedy. Prompts are batched by
    length, so no padding (and no padding-mask subtleties) is involved."""
    gen = torch.Generator().manual_seed(seed)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for length in sorted(by_len):
        idx = by_len[length]
        step = model(input_ids=torch.tensor([prompts[i] for i in idx]), use_cache=True)
        done = torch.zeros(len(idx), dtype=torch.bool)
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
                    out[idx[j]].append(int(nxt[j]))
            if done.all():
                break
            step = model(input_ids=nxt[:, None], past_key_values=step.past_key_values, use_cache=True)
    return out


def success_rate(model, tok, pairs, with_solution: bool = False, temperature: float = 1.0,
                 seed: int = EVAL_SEED) -> float:
    """Fraction of ``pairs`` answered exactly (as ``environments.arithmetic`` verifies: stripped text)."""
    was_training = model.training
    model.eval()
    prompts = [_prompt_ids(tok, a, b, with_solution) for a, b in pairs]
    outs = sample(model, prompts, tok.eos_token_id, temperature, seed)
    model.train(was_training)
    ok = sum(tok.decode(o, skip_special_tokens=True).strip() == str(a + b) for o, (a, b) in zip(outs, pairs))
    return ok / len(pairs)


def train_tiny_model(seed: int = SEED, max_steps: int = MAX_STEPS, target: float = TARGET_SUCCESS,
                     target_with_solution: float = TARGET_WITH_SOLUTION, log: Callable[[str], None] = print):
    """Builds and warm-starts the model in memory. Returns (model, tokenizer, metrics). The caller's
    RNG state and thread count are left as they were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # fixed, so that CPU kernels reduce in the same order on every build
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the weight initialisation; batches and sampling use own generators
            return _train(seed, max_steps, target, target_with_solution, log)
    finally:
        torch.set_num_threads(threads)


def _train(seed, max_steps, target, target_with_solution, log):
    start = time.perf_counter()
    tok = build_tokenizer()
    model = Qwen2ForCausalLM(tiny_model_config(len(tok)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    train, test = split_pairs("train"), split_pairs("test")
    plain_ids, plain_labels = _examples(tok, train, with_solution=False)
    teach_ids, teach_labels = _examples(tok, train, with_solution=True)
    gen = torch.Generator().manual_seed(seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[tiny] {MODEL_NAME}: {n_params / 1e6:.2f}M params, vocab {len(tok)}, "
        f"{len(train)} train / {len(test)} test pairs")

    history, step, phase, success, with_solution, phase2_step = [], 0, 1, 0.0, 0.0, None
    while step < max_steps:
        n_plain, n_teach = PHASE1_BATCH if phase == 1 else PHASE2_BATCH
        bp = torch.randint(len(train), (n_plain,), generator=gen)
        bt = torch.randint(len(train), (n_teach,), generator=gen)
        lp, np_ = _loss_sum(model, plain_ids[bp], plain_labels[bp])
        lt, nt = _loss_sum(model, teach_ids[bt], teach_labels[bt])
        loss = (lp + lt) / (np_ + nt)  # mean over every completion token of the step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % EVAL_EVERY[phase] and step != max_steps:
            continue
        # Measure only what can change the course: copying in phase 1; in phase 2 the student, and
        # the teacher (4x dearer: longer prompts) once the student is there.
        record = {"step": step, "phase": phase, "loss": round(loss.item(), 4)}
        if phase == 2 or step == max_steps:
            success = record["heldout_success_t1"] = success_rate(model, tok, test, temperature=1.0)
        if phase == 1 or success >= target or step == max_steps:
            with_solution = record["with_solution_success_t1"] = success_rate(
                model, tok, test, with_solution=True, temperature=1.0)
        history.append(record)
        log(f"[tiny] step {step} (phase {phase}): loss {loss.item():.3f}"
            + "".join(f", {k} {v:.3f}" for k, v in record.items() if k.endswith("_t1"))
            + f", {time.perf_counter() - start:.0f}s")
        if phase == 1 and with_solution >= PHASE1_WITH_SOLUTION:
            phase, phase2_step = 2, step
        elif phase == 2 and success >= target and with_solution >= target_with_solution:
            break
    if success < target or with_solution < target_with_solution:
        log(f"[tiny] warning: targets missed after {step} steps: held-out success {success:.3f} "
            f"(target {target}), with the answer shown {with_solution:.3f} (target {target_with_solution})")

    model.eval()
    metrics = {
        "name": MODEL_NAME,
        "seed": seed,
        "steps": step,
        "phase2_from_step": phase2_step,
        "heldout_success_t1": success,
        "heldout_success_greedy": success_rate(model, tok, test, temperature=0.0),
        "with_solution_success_t1": with_solution,
        "with_solution_success_greedy": success_rate(model, tok, test, with_solution=True, temperature=0.0),
        "heldout_pairs": len(test),
        "params": n_params,
        "vocab_size": len(tok),
        "recipe": {"lr": LR, "phase1_batch": PHASE1_BATCH, "phase2_batch": PHASE2_BATCH,
                   "phase1_with_solution": PHASE1_WITH_SOLUTION, "eval_every": EVAL_EVERY,
                   "target_success": target, "target_with_solution": target_with_solution,
                   "max_steps": max_steps, "eval_seed": EVAL_SEED},
        "history": history,
        "torch_version": torch.__version__,
    }
    metrics["seconds"] = round(time.perf_counter() - start, 1)  # the whole build, final evaluations included
    return model, tok, metrics


def ensure_tiny_model(cache_dir: str | None = None, log: Callable[[str], None] = print, force: bool = False) -> str:
    """Path of the warm-started tiny model (a Hugging Face model directory), built on first use."""
    path, metrics = ensure_built(MODEL_NAME, lambda: train_tiny_model(log=log), cache_dir=cache_dir, force=force,
                                 log=log, expected="about 2 minutes")
    if metrics is not None:
        log(f"[tiny] saved {path}: held-out success {metrics['heldout_success_t1']:.2f} (T=1), "
            f"{metrics['heldout_success_greedy']:.2f} (greedy), {metrics['with_solution_success_t1']:.2f} with "
            f"the solution shown; {metrics['steps']} steps, {metrics['seconds']}s")
    return path


def main(argv: list[str] | None = None) -> None:
    cli("python -m models.tiny_arithmetic", __doc__.split("\n\n")[0], ensure_tiny_model, argv)


if __name__ == "__main__":
    main()
