"""TRL's side of the end-to-end benchmark: `trl.experimental.sdpo.SDPOTrainer.train()` itself (HF
generate, rewards, its teacher contexts, teacher + student forwards, backward, AdamW, its EMA
callback), one process. Run with TRL's virtual environment; our code is not imported, only the
repo's `environments` package (pure Python) for the tasks and the reward.

A callback holds the trainer at the start of every optimizer step until the driver says "step"
(so both sides are stepped in turn), and answers with the step's seconds when it ends. Phases:
`generate` is `_generate` (HF generate), `prepare` the rest of `_prepare_training_batch` (rewards,
advantages, teacher prompts), `learn` the remainder of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "learner"), os.path.join(HERE, "..", "..")]

import torch
from e2e_plan import load_plan
from protocol import reply


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--plan", required=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    started = time.perf_counter()

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    from environments import load_environment

    plan = load_plan(a.plan)
    s = plan["size"]
    env = load_environment(plan["environment"], {})
    by_id = {t.id: t for split in ("train", "test") for t in env.tasks(split)}
    # The prompts of every step in the driver's order; shuffle_dataset=False keeps that order.
    rows = [{"prompt": by_id[i].messages, "task_id": i} for step in plan["steps"] for i in step]

    def reward(completions, task_id, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [env.verify(by_id[i], text).reward for i, text in zip(task_id, texts)]

    tokenizer = AutoTokenizer.from_pretrained(plan["model_path"])
    batch = s["prompts"] * s["samples"]
    output_dir = tempfile.mkdtemp(prefix="trl-e2e-")  # removed at quit (save_strategy="no" writes nothing of ours)
    args = SDPOConfig(
        output_dir=output_dir, report_to=[], seed=plan["seed"], use_cpu=True,
        logging_steps=10**9, save_strategy="no", max_steps=len(plan["steps"]), shuffle_dataset=False,
        per_device_train_batch_size=s["micro"], gradient_accumulation_steps=batch // s["micro"],
        num_generations=s["samples"], max_completion_length=s["max_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=s["lr"], weight_decay=0.01, max_grad_norm=1.0, warmup_steps=0, lr_scheduler_type="constant",
        adam_beta1=0.9, adam_beta2=0.999,
        distillation_mode="topk_logits", distillation_topk=100, distillation_add_tail=True, distillation_alpha=0.5,
        distillation_weight=1.0, teacher_model_kind="ema", teacher_update_rate=s["ema"], teacher_sync_steps=1,
        success_reward_threshold=s["success_threshold"], dont_reprompt_on_self_success=True,
        remove_thinking_from_demonstration=True, include_environment_feedback=True,
        environment_feedback_only_without_solution=True, max_reprompt_len=10240, **plan["templates"],
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
        dataloader_num_workers=0, gradient_checkpointing=False, bf16=False,  # ours: fp32, no activation checkpointing
        # random-init sizes: every response is max_completion_length tokens on both sides (no EOS), so
        # the two sides do the same work per step whatever each engine happens to sample
        generation_kwargs={"min_new_tokens": s["max_tokens"]} if plan["fixed_length"] else None,
    )
    trainer = SDPOTrainer(model=plan["model_path"], reward_funcs=[reward], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    phases: dict[str, float] = {}
    last: dict = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    prepare = trainer._prepare_training_batch

    def prepare_and_keep(inputs):
        out = timed("prepare_all", prepare)(inputs)
        last["batch"] = out
        last["task_ids"] = [x["task_id"] for x in inputs]
        return out

    trainer._prepare_training_batch = prepare_and_keep

    def evaluate() -> dict:
        model = trainer.model
        was_training = model.training
        model.eval()
        tasks = [by_id[i] for i in plan["eval"]]
        ids = [tokenizer.apply_chat_template(t.messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for t in tasks]
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        torch.manual_seed(10_000_019 + plan["seed"])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=trainer.generation_config)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        verdicts = [env.verify(t, text) for t, text in zip(tasks, texts)]
        model.train(was_training)
        return {"success_t1": sum(v.reward >= 0.5 for v in verdicts) / len(verdicts)}

    def teacher_batch() -> dict:
        b = last["batch"]
        out = {"task_ids": last["task_ids"], "teacher_prompt_ids": [], "completions": [], "rewards": b["rewards"].tolist(),
               "sd_mask": [int(x) for x in b["self_distillation_mask"].tolist()]}
        width = b["completion_ids"].shape[1]
        for ids, mask, c, cm in zip(b["teacher_input_ids"], b["teacher_attention_mask"], b["completion_ids"], b["completion_mask"]):
            out["teacher_prompt_ids"].append(ids[:-width][mask[:-width].bool()].tolist())
            out["completions"].append(c[cm.bool()].tolist())
        return out

    def check(path: str) -> dict:
        """TRL's own teacher-context builder on our side's batch (its prompts, completions, rewards)."""
        with open(path) as f:
            ours = json.load(f)
        prompts = [by_id[i].messages for i in ours["task_ids"] for _ in range(s["samples"])]
        completions = ours["completions"]
        width = max(1, max(map(len, completions)))
        pad = tokenizer.pad_token_id
        output = {"completion_ids": torch.tensor([c + [pad] * (width - len(c)) for c in completions]),
                  "completion_mask": torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])}
        built = trainer.teacher_context_builder.build(output, prompts, torch.tensor(ours["rewards"]),
                                                      feedbacks=[None] * len(prompts))
        ids, mask = built["teacher_input_ids"][:, :-width], built["teacher_attention_mask"][:, :-width]
        return {"teacher_prompt_ids": [row[m.bool()].tolist() for row, m in zip(ids, mask)],
                "sd_mask": [int(x) for x in built["self_distillation_mask"].tolist()]}

    class Gate(TrainerCallback):
        """Hold every optimizer step until the driver asks for it; report its time at its end."""

        def on_step_begin(self, args, state, control, **kwargs):
            for line in sys.stdin:
                command = line.strip()
                if command == "step":
                    break
                if command == "eval":
                    reply(evaluate())
                elif command == "batch":
                    reply(teacher_batch())
                elif command.startswith("check "):
                    reply(check(command.split(" ", 1)[1]))
                elif command == "quit":
                    shutil.rmtree(output_dir, ignore_errors=True)
                    sys.stdout.flush()
                    os._exit(0)  # the trainer would otherwise go on to its next step
            phases.clear()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # after TRL's EMA callback (added earlier)
            seconds = time.perf_counter() - self.begin
            generate, prepare = phases.get("generate", 0.0), phases.get("prepare_all", 0.0)
            reply({"seconds": seconds, "phases": {"generate": generate, "prepare": prepare - generate, "learn": seconds - prepare},
                   "response_tokens": int(last["batch"]["completion_mask"].sum())})

    trainer.add_callback(Gate())
    reply({"ready": True, "pid": os.getpid(), "startup_s": time.perf_counter() - started,
           "params": sum(x.numel() for x in trainer.model.parameters())})
    trainer.train()
    # after the last step: answer eval / batch / quit until told to stop
    Gate().on_step_begin(None, None, None)


if __name__ == "__main__":
    main()
