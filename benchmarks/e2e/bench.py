"""End to end against TRL's SDPOTrainer: whole training steps (generate, verify, teacher contexts,
learn, weight sync / TRL's equivalent), both sides in one run, stepped in turn.

    python benchmarks/e2e/bench.py --size quickstart --steps 30 --eval
    python benchmarks/e2e/bench.py --size 20m --steps 3
    python benchmarks/e2e/bench.py --size 100m --steps 2

TRL 1.16 runs from /tmp/venv-trl (benchmarks/RESULTS.md, "Learner", says how to make it). Same model
folder, prompts (the same tasks in the same order every step), samples per prompt, response limit,
temperature, and loss settings on both sides (workload.py). The run proves the match:
- teacher prompts: our side's last batch (its completions and rewards) is handed to TRL's own
  teacher-context builder, and the token ids it builds are compared with ours, sample by sample;
- the loss: benchmarks/loss/agreement.py (TRL's loss functions against ours on the same logits) is
  run with TRL's Python, and its top-100 + tail, alpha 0.5 case is reported.
Times are medians over the steps after the first (which holds one-off warm-up on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path[:0] = [HERE, os.path.join(HERE, "..", "learner"), ROOT]

from e2e_plan import SIZES, save_plan
from harness import interleave, load_average, started

TRL_PYTHON = os.environ.get("TRL_PYTHON", "/tmp/venv-trl/bin/python")
MODELS_DIR = os.environ.get("SDPO_E2E_MODELS", os.path.join(tempfile.gettempdir(), "sdpo-e2e-models"))


def model_for(size: str) -> str:
    """The quickstart's cached model, or a random-init Qwen2 with its tokenizer and vocabulary."""
    from sdpo.models import resolve_model_path

    tiny = resolve_model_path("tiny-arithmetic")
    shape = SIZES[size]["model"]
    if isinstance(shape, str):
        return tiny
    directory = os.path.join(MODELS_DIR, size)
    if not os.path.exists(os.path.join(directory, "model.safetensors")):
        import torch
        from transformers import AutoConfig, Qwen2ForCausalLM

        config = AutoConfig.from_pretrained(tiny)
        for key, value in shape.items():
            setattr(config, key, value)
        config.layer_types = ["full_attention"] * config.num_hidden_layers
        torch.manual_seed(0)
        tmp = directory + ".tmp"
        Qwen2ForCausalLM(config).save_pretrained(tmp)
        for name in os.listdir(tiny):  # tokenizer and generation config
            if not name.startswith(("model", "config", "metrics")):
                shutil.copy(os.path.join(tiny, name), tmp)
        os.replace(tmp, directory)
    return directory


def make_plan(size: str, steps: int, seed: int, eval_tasks: int | None) -> dict:
    from environments import load_environment
    from sdpo.trainer import PromptSampler

    name = "environments.arithmetic:Arithmetic"
    env = load_environment(name, {})
    sampler = PromptSampler(list(env.tasks("train")), seed)
    s = SIZES[size]
    held_out = list(env.tasks("test"))[:eval_tasks]
    from sdpo.config import TeacherContextConfig

    ours = TeacherContextConfig()  # our defaults, which TRL is given explicitly (its own differ in whitespace)
    templates = {k: getattr(ours, k) for k in ("reprompt_template", "solution_template", "feedback_template")}
    return {"size": s, "size_name": size, "templates": templates, "seed": seed, "environment": name, "model_path": model_for(size),
            "steps": [[t.id for t in sampler.next(s["prompts"])] for _ in range(steps)],
            "eval": [t.id for t in held_out], "fixed_length": not isinstance(s["model"], str)}


def loss_agreement() -> float | str:
    out = subprocess.run([TRL_PYTHON, os.path.join(HERE, "..", "loss", "agreement.py"),
                          "--tokens", "64", "--vocab", "512", "--hidden", "64", "--chunk-tokens", "32"], capture_output=True, text=True)
    try:
        cases = json.loads(out.stdout.strip().splitlines()[-1])["trl_vs_ours"]
        return max(max(c["max_abs_diff_loss"], c["max_abs_diff_grad_logits"]) for c in cases
                   if c["mode"] == "topk_logits" and c["alpha"] == 0.5 and c["add_tail"] and c["dtype"] == "float32")
    except (IndexError, KeyError, TypeError, ValueError) as err:
        return f"agreement.py gave no comparison ({type(err).__name__}): {out.stderr[-300:]}"


def teacher_prompts_match(ours, trl) -> dict:
    batch = ours.ask("batch")
    path = os.path.join(tempfile.gettempdir(), f"sdpo-e2e-batch-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(batch, f)
    theirs = trl.ask(f"check {path}")
    os.remove(path)
    same = sum(a == b for a, b in zip(batch["teacher_prompt_ids"], theirs["teacher_prompt_ids"]))
    return {"samples": len(batch["teacher_prompt_ids"]), "identical_teacher_prompts": same,
            "with_signal": sum(batch["sd_mask"]), "sd_mask_equal": batch["sd_mask"] == theirs["sd_mask"]}


def summary(records: list[dict], samples: int) -> dict:
    timed = records[1:] or records
    seconds = statistics.median(r["seconds"] for r in timed)
    phases = {k: statistics.median(r["phases"][k] for r in timed) for k in timed[0]["phases"]}
    return {"s_per_step": seconds, "samples_per_s": samples / seconds, "phases_s": phases,
            "steps_timed": len(timed), "first_step_s": records[0]["seconds"],
            "response_tokens": statistics.median(r.get("response_tokens", 0) for r in timed)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=sorted(SIZES), default="quickstart")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="store_true", help="held-out success at T=1 before and after (300 sums)")
    p.add_argument("--threads", type=int, default=2, help="TRL's torch threads (the machine's cores)")
    p.add_argument("--ours", default="[]", help="JSON list of extra overrides for our side")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help='another side of ours with these overrides, e.g. ours-2ranks=["learner.world_size=2"]')
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    plan = make_plan(a.size, a.steps, a.seed, 300)
    plan_path = os.path.join(tempfile.gettempdir(), f"sdpo-e2e-plan-{os.getpid()}.json")
    save_plan(plan_path, plan)
    logs = tempfile.mkdtemp(prefix="sdpo-e2e-logs-")
    python = os.path.join(ROOT, ".venv", "bin", "python")
    samples = plan["size"]["prompts"] * plan["size"]["samples"]
    result: dict = {"size": a.size, "steps": a.steps, "seed": a.seed, "load_before": load_average(),
                    "loss_max_abs_diff_topk100_tail_alpha05": loss_agreement()}
    specs = [("ours", [python, os.path.join(HERE, "side_ours.py"), "--plan", plan_path, "--overrides", a.ours],
              os.path.join(logs, "ours.log")),
             *[(name, [python, os.path.join(HERE, "side_ours.py"), "--plan", plan_path, "--overrides", overrides],
                os.path.join(logs, f"{name}.log")) for name, _, overrides in (v.partition("=") for v in a.variant)],
             ("trl", [TRL_PYTHON, os.path.join(HERE, "side_trl.py"), "--plan", plan_path, "--threads", str(a.threads)],
              os.path.join(logs, "trl.log"))]
    with started(specs) as sides:
        result["ready"] = {s.name: s.ready for s in sides}
        if a.eval:
            result["before"] = {s.name: s.ask("eval") for s in sides}
        records = interleave(sides, a.steps, warmup=0)
        result["check"] = teacher_prompts_match(sides[0], sides[-1])
        if a.eval:
            result["after"] = {s.name: s.ask("eval") for s in sides}
    result["load_after"] = load_average()
    result["sides"] = {name: summary(r, samples) for name, r in records.items()}
    result["records"] = records
    result["speedup"] = {name: result["sides"]["trl"]["s_per_step"] / side["s_per_step"]
                         for name, side in result["sides"].items() if name != "trl"}
    os.remove(plan_path)
    print(f"size {a.size}: {result['ready']['ours'].get('params', 0) / 1e6:.2f}M params, {samples} samples/step, "
          f"{a.steps} steps (first excluded); load {result['load_before']} -> {result['load_after']}")
    for name, s in result["sides"].items():
        phases = ", ".join(f"{k} {v:.3f}" for k, v in s["phases_s"].items())
        extra = ""
        if a.eval:
            extra = f" | held-out T=1 {result['before'][name]['success_t1']:.3f} -> {result['after'][name]['success_t1']:.3f}"
        print(f"{name:>5}: {s['s_per_step']:.3f} s/step, {s['samples_per_s']:.1f} samples/s, "
              f"{s['response_tokens']:.0f} response tokens/step ({phases}); "
              f"start-up {result['ready'][name]['startup_s']:.1f} s{extra}")
    print(f"throughput / TRL's: {', '.join(f'{k} {v:.2f}x' for k, v in result['speedup'].items())}; teacher prompts: {result['check']}; "
          f"loss and logit-gradient |TRL - ours| on the same logits (fp32): {result['loss_max_abs_diff_topk100_tail_alpha05']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    shutil.rmtree(logs, ignore_errors=True) if a.out else print(f"logs: {logs}")


if __name__ == "__main__":
    main()
