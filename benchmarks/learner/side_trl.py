"""TRL's SDPOTrainer doing our learner step's work in this process (run with TRL's environment).

Only the learner part is driven: the trainer's own training_step would first call _prepare_inputs,
which generates rollouts, so this feeds compute_loss the batch dict that generation would have
produced (left-padded prompts, right-padded completions, teacher prompt + the same completion ids,
self-distillation mask, rollout log-probs), per micro-batch with gradient accumulation, then
clips, steps AdamW and the scheduler, and syncs the EMA teacher as the trainer's callback does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from protocol import serve  # noqa: E402
from workload import load_batch  # noqa: E402


def _pad(rows: list[list], value, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


def micro_inputs(samples: list[dict], device) -> dict:
    prompt = [s["prompt_ids"] for s in samples]
    completion = [s["response_ids"] for s in samples]
    teacher = [s["teacher_prompt_ids"] for s in samples]
    completion_ids = _pad(completion, 0, left=False)
    completion_mask = _pad([[1] * len(c) for c in completion], 0, left=False)
    inputs = {
        "prompt_ids": _pad(prompt, 0, left=True),
        "prompt_mask": _pad([[1] * len(p) for p in prompt], 0, left=True),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "teacher_input_ids": torch.cat([_pad(teacher, 0, left=True), completion_ids], dim=1),
        "teacher_attention_mask": torch.cat([_pad([[1] * len(t) for t in teacher], 0, left=True), completion_mask], dim=1),
        "self_distillation_mask": torch.tensor([float(s["sd_mask"]) for s in samples]),
        "old_per_token_logps": _pad([s["rollout_logprobs"] for s in samples], 0.0, left=False).float(),
        "advantages": torch.zeros(len(samples)),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def build_trainer(model_dir: str, batch_size: int, micro: int, device: str, bf16: bool, vocab: int, checkpointing: bool):
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    # Token ids only: TRL's tokenizer is needed to build the trainer, never to tokenize here.
    words = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<pad>")),
                                        pad_token="<pad>", eos_token="<eos>")
    args = SDPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), report_to=[], seed=0,
        use_cpu=device == "cpu", bf16=bf16, gradient_checkpointing=checkpointing,
        per_device_train_batch_size=micro, gradient_accumulation_steps=batch_size // micro,
        num_generations=min(8, batch_size), learning_rate=1e-5, weight_decay=0.01, max_grad_norm=1.0,
        warmup_steps=0, lr_scheduler_type="constant",
        distillation_mode="topk_logits", distillation_topk=100, distillation_add_tail=True, distillation_alpha=0.5,
        teacher_model_kind="ema", teacher_update_rate=0.05,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
    )
    dataset = Dataset.from_list([{"prompt": "t2 t3"}] * batch_size)
    return SDPOTrainer(model=model_dir, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
                       train_dataset=dataset, processing_class=tokenizer)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", required=True)
    p.add_argument("--micro", type=int, required=True, help="samples per micro-batch (gradient accumulation)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--checkpointing", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from trl.experimental.sdpo.teacher_sync import SyncTeacherModelCallback

    batch = load_batch(a.batch)
    vocab = max(max(s["prompt_ids"] + s["response_ids"] + s["teacher_prompt_ids"]) for s in batch) + 1
    trainer = build_trainer(a.model, len(batch), a.micro, a.device, a.bf16, vocab, a.checkpointing)
    model = trainer.accelerator.prepare_model(trainer.model)  # device placement (+ autocast under bf16), as train() does
    model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    accumulation = len(batch) // a.micro
    trainer.current_gradient_accumulation_steps = accumulation  # compute_loss divides by it
    sync = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SyncTeacherModelCallback))
    device = trainer.accelerator.device
    micros = [micro_inputs(batch[i : i + a.micro], device) for i in range(0, len(batch), a.micro)]

    def step() -> dict:
        total = 0.0
        for inputs in micros:
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs)
            trainer.accelerator.backward(loss)
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync.sync_target_model(model, trainer.teacher_model, trainer.args.teacher_update_rate)
        return {"loss": total, "grad_norm": float(grad_norm), "micro_batches": len(micros)}

    cuda = a.device == "cuda"
    serve(step, sync=torch.cuda.synchronize if cuda else (lambda: None),
          cuda_peak_mib=(lambda: torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
          cuda_reset=torch.cuda.reset_peak_memory_stats if cuda else None)


if __name__ == "__main__":
    main()
