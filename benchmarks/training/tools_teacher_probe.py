"""How the tiny-calculator model does as SDPO's teacher vs as the student (benchmarks/RESULTS.md,
"Multi-turn tool use"): on 64 held-out tasks, teacher-forced log-prob and greedy agreement on each
task's correct episode after the student's prompt and after the teacher prompt (the recipe's
``turns`` form, and the ``episode`` and ``final_answer`` text forms in the default reprompt), and
sampled episodes (T=1) with that prompt. Single process, ~1 min.

    python benchmarks/training/tools_teacher_probe.py [MODEL_DIR]   # default: the built-in model
"""

from __future__ import annotations

import sys

import torch
from transformers import Qwen2ForCausalLM

from environments.calculator import Calculator, question, split_pairs
from models import tiny_calculator as tc
from models.tiny_arithmetic import teacher_user_text
from sdpo.chat import chat_ids
from sdpo.episodes import EpisodeLimits, demonstration_text, run_episodes
from sdpo.rollout.base import Sampling

TASKS = 64


def prompt_ids(tok, a: int, b: int, form: str) -> list[int]:
    if form == "turns":
        return tc.teacher_prompt(tok, a, b)
    if form == "student":
        text = question(a, b)
    else:
        text = teacher_user_text(question(a, b), demonstration_text(tc.demonstration_episode(a, b), form))
    return chat_ids(tok, [{"role": "user", "content": text}], tools=Calculator.tools)


@torch.no_grad()
def forced(model, tok, pairs, form: str) -> dict:
    """Means over the model's tokens of the correct episodes (and over their copied digits)."""
    sums = {"logp": 0.0, "agree": 0.0, "n": 0, "digit_logp": 0.0, "digit_agree": 0.0, "digits": 0}
    for a, b in pairs:
        prompt = prompt_ids(tok, a, b, form)
        response, mask = tc._episode(tok, a, b)
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
        target = torch.tensor(response)
        logp = torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
        agree = (logits.argmax(-1) == target).float()
        model_tok = torch.tensor(mask, dtype=torch.bool)
        digit = model_tok & torch.tensor([tok.decode([t]).isdigit() for t in response])
        sums["logp"] += logp[model_tok].sum().item()
        sums["agree"] += agree[model_tok].sum().item()
        sums["n"] += int(model_tok.sum())
        sums["digit_logp"] += logp[digit].sum().item()
        sums["digit_agree"] += agree[digit].sum().item()
        sums["digits"] += int(digit.sum())
    return {"logp_per_token": sums["logp"] / sums["n"], "greedy_agreement": sums["agree"] / sums["n"],
            "digit_logp": sums["digit_logp"] / sums["digits"], "digit_agreement": sums["digit_agree"] / sums["digits"]}


def sampled(model, tok, form: str) -> dict:
    env = Calculator(limit_per_split=TASKS)
    tasks = env.tasks("test")
    prompts = [prompt_ids(tok, a, b, form) for a, b in split_pairs("test")[:TASKS]]
    sampling = Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=tc.MAX_EPISODE_TOKENS,
                        stop_token_ids=(tok.eos_token_id,), seed=tc.EVAL_SEED)
    episodes = [g[0] for g in run_episodes(tc._generate(model, tok), tok, env, tasks, sampling,
                                           EpisodeLimits(3, tc.MAX_EPISODE_TOKENS, 10.0), prompts)]
    return {"any_tool_call": sum(bool(e.messages[0].get("tool_calls")) for e in episodes) / len(episodes),
            "success": sum(e.verdict.reward for e in episodes) / len(episodes)}


def main() -> None:
    torch.set_num_threads(2)
    path = sys.argv[1] if len(sys.argv) > 1 else tc.ensure_tiny_calculator()
    tok = tc.build_tokenizer()
    model = Qwen2ForCausalLM.from_pretrained(path).eval()
    pairs = split_pairs("test")[:TASKS]
    for form in ("student", "turns", "episode", "final_answer"):
        row = {**forced(model, tok, pairs, form), **sampled(model, tok, form)}
        print(form, {k: round(v, 3) for k, v in row.items()}, flush=True)


if __name__ == "__main__":
    main()
