"""One FSDP2 learner rank (a Ray actor): student forward/backward, teacher forward, the SDPO loss,
the optimizer and the EMA teacher. It sees token ids and a loss configuration, nothing else."""

from __future__ import annotations

import copy
import math
import os
import socket

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from sdpo.batch import TrainSample
from sdpo.config import Config
from sdpo.learner.model import load_causal_lm, pick_attention, response_logits, shard
from sdpo.loss import aggregate, divergence_per_token, rollout_is_weights, token_logprobs
from sdpo.rollout.weights import write_weights


class LearnerWorker:
    def __init__(self, rank: int, world_size: int, config_json: str, model_path: str):
        self.rank, self.world_size = rank, world_size
        self.cfg = Config.model_validate_json(config_json)
        self.model_path = model_path
        torch.set_num_threads(self.cfg.learner.torch_threads_per_rank)
        torch.manual_seed(self.cfg.seed + rank)

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's address and a free port on its node, for torch.distributed."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return _node_ip(), port

    def setup(self, master_addr: str, master_port: int) -> int:
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        cuda = self.cfg.device == "cuda"
        if cuda:
            torch.cuda.set_device(0)  # Ray gives each rank its own GPU as device 0
        self.device = torch.device("cuda" if cuda else "cpu")
        dist.init_process_group("nccl" if cuda else "gloo", rank=self.rank, world_size=self.world_size)
        mesh = init_device_mesh(self.device.type, (self.world_size,))

        attention = pick_attention(self.cfg.model.attn_implementation, self.cfg.device)
        student = load_causal_lm(self.model_path, attention)
        # The EMA teacher starts as the initial checkpoint and is sharded exactly like the student,
        # so its update is a local lerp on each rank's shard: no gathering.
        teacher = copy.deepcopy(student).requires_grad_(False)
        self.student = shard(student.to(self.device), mesh, self.cfg.learner.mixed_precision)
        self.teacher = shard(teacher.to(self.device), mesh, self.cfg.learner.mixed_precision, no_grad=True).eval()
        opt = self.cfg.optimizer
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
        warmup = max(1, opt.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return sum(p.numel() for p in self.student.parameters())

    def train_step(self, samples: list[TrainSample], total_sequences: int, total_tokens: int) -> dict[str, float]:
        """One optimizer step on this rank's share of the batch; returns sums for the driver to add up."""
        cfg = self.cfg
        self.student.train()
        sums = {"loss": 0.0, "logp_gap_abs": 0.0, "is_weight": 0.0, "tokens": 0.0}
        size = cfg.learner.samples_per_micro_batch
        for start in range(0, len(samples), size):
            micro = samples[start : start + size]
            responses = [s.response_ids for s in micro]
            with torch.no_grad():
                teacher_logits = response_logits(self.teacher, [s.teacher_prompt_ids for s in micro], responses, self.device)
            student_logits = response_logits(self.student, [s.prompt_ids for s in micro], responses, self.device)

            sampled = torch.tensor([t for r in responses for t in r], device=self.device)
            seq_index = torch.repeat_interleave(torch.arange(len(micro)), torch.tensor([len(r) for r in responses])).to(self.device)
            rollout_logp = torch.tensor([lp for s in micro for lp in s.rollout_logprobs], device=self.device)
            # One optimizer step per batch: before the update, the learner's "old" log-probs are
            # exactly this forward's, detached. No extra no-grad pass is needed.
            learner_logp = token_logprobs(student_logits, sampled).detach()
            weight = rollout_is_weights(learner_logp, rollout_logp, cfg.loss.rollout_is_cap) if cfg.loss.rollout_is else torch.ones_like(learner_logp)

            per_token = divergence_per_token(student_logits, teacher_logits, alpha=cfg.loss.alpha, topk=cfg.loss.topk, add_tail=cfg.loss.add_tail)
            sd_mask = torch.tensor([s.sd_mask for s in micro], dtype=torch.float32, device=self.device)
            loss = aggregate(per_token, weight, seq_index, sd_mask, mode=cfg.loss.aggregation,
                             total_sequences=total_sequences, total_tokens=total_tokens)
            # `aggregate` already divides by global totals; FSDP averages gradients over ranks,
            # so scaling by the world size makes the result a sum over ranks.
            (loss * self.world_size).backward()

            sums["loss"] += loss.item()
            sums["logp_gap_abs"] += (learner_logp - rollout_logp).abs().sum().item()
            sums["is_weight"] += weight.sum().item()
            sums["tokens"] += float(sampled.numel())

        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.optimizer.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self._update_teacher()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        sums.update(grad_norm=grad_norm, skipped_step=float(not finite), lr=self.scheduler.get_last_lr()[0])
        return sums

    @torch.no_grad()
    def _update_teacher(self) -> None:
        rate = self.cfg.teacher.update_rate
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t_local = t.to_local() if isinstance(t, DTensor) else t
            t_local.lerp_(s.to_local() if isinstance(s, DTensor) else s, rate)

    def export_weights(self, directory: str, version: int, teacher: bool = False) -> str | None:
        """Full student (or teacher) weights as one file. Every rank joins the gather; rank 0 writes."""
        model = self.teacher if teacher else self.student
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = write_weights(state, directory, version) if self.rank == 0 else None
        dist.barrier()
        return path

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
