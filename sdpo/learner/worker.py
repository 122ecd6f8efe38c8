"""One FSDP2 learner rank (a Ray actor): student forward/backward, teacher forward, the SDPO loss,
the optimizer and the EMA teacher. It sees token ids and a loss configuration, nothing else."""

from __future__ import annotations

import contextlib
import math
import os
import socket

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from sdpo.batch import TrainSample
from sdpo.config import Config
from sdpo.learner.full_state import full_state
from sdpo.learner.lora import TeacherAdapters, adapter_state, merged_full_tensors
from sdpo.learner.micro_batches import shares_prompts
from sdpo.learner.model import lm_head_weight, load_sharded, pick_attention, response_hidden, response_logits
from sdpo.learner.objective import MicroBatch, Scores, Totals, micro_batch_loss
from sdpo.learner.packing import PACKED_SDPA
from sdpo.learner.schedule import make_scheduler
from sdpo.learner.shard_file import ShardWriter
from sdpo.loss import gather_entropy_threshold, top_entropy_mask
from sdpo.placement import rollout_torch_dtype
from sdpo.weight_sync.adapters import adapter_payload, write_adapter_folder
from sdpo.weight_sync.broadcast import join_weight_group
from sdpo.weight_sync.files import savable, write_weights
from sdpo.weight_sync.learner_side import iter_full_tensors, push_weights

_PER_STEP = {"loss", "sd_loss", "pg_loss"}  # metrics whose value per step is already a mean over its (mini-)batch


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

        learner = self.cfg.learner
        self.packed = learner.max_tokens_per_micro_batch is not None
        attention = pick_attention(self.cfg.model.attn_implementation, self.cfg.device, packed=self.packed,
                                   mixed_precision=learner.mixed_precision)
        # as the driver planned it (its budget counted shared prompts once); only sdpa_packed implements it
        self.share_prompts = shares_prompts(self.cfg)[0] and attention == PACKED_SDPA
        # sharded from the start (meta device, then each rank's rows from safetensors): no rank holds a full copy
        lora = self.cfg.model.lora if self.cfg.model.lora.enabled else None
        self.student = load_sharded(self.model_path, attention, mesh, learner.mixed_precision, self.device,
                                    checkpointing=learner.activation_checkpointing, lora=lora, seed=self.cfg.seed)
        self.lora = lora
        # LoRA: the teacher (ema, frozen, trust_region) is a second set of adapter values on the same base
        self.teacher_adapters = (TeacherAdapters(self.student) if lora and self.cfg.has_separate_teacher
                                 and self.cfg.teacher.kind != "checkpoint" else None)
        self.teacher = None if self.teacher_adapters else self._make_teacher(attention, mesh)
        self._shard_writers: dict[int, ShardWriter | None] = {}  # by id(model): None where exports gather
        opt = self.cfg.optimizer
        trained = [p for p in self.student.parameters() if p.requires_grad]  # LoRA: the adapters only
        self.optimizer = torch.optim.AdamW(trained, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, self.cfg)
        return sum(p.numel() for p in self.student.parameters())

    def _make_teacher(self, attention: str, mesh) -> torch.nn.Module | None:
        """A separate teacher model, sharded exactly like the student so that an EMA update is a
        local lerp on each rank's shard (no gathering). None when the teacher is the live policy
        or the objective needs no teacher. Loaded from the checkpoint like the student (no copy of it)."""
        if not self.cfg.has_separate_teacher:
            return None
        kind = self.cfg.teacher.kind
        # ema, frozen, trust_region: all start from the initial checkpoint
        path = self.cfg.teacher.path if kind == "checkpoint" else self.model_path
        teacher = load_sharded(path, attention, mesh, self.cfg.learner.mixed_precision, self.device, no_grad=True,
                               offload=self.cfg.learner.teacher_offload)
        if teacher.get_output_embeddings().weight.shape[0] != self.student.get_output_embeddings().weight.shape[0]:
            raise ValueError(f"teacher.path={self.cfg.teacher.path!r}: its vocabulary differs from the student's")
        return teacher.eval()

    def _scores(self, model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]],
                keep: torch.Tensor | None = None) -> Scores:
        """Scores of the distribution the engine sampled from: the logits divided by
        rollout.temperature, as the engines' log-probs are (sdpo/rollout/base.py), for student and
        teacher alike (the authors' code and TRL do the same)."""
        chunk = self.cfg.loss.chunk_tokens
        if not chunk:
            scores = Scores(logits=response_logits(model, prompts, responses, self.device, self.packed, self.share_prompts))
        else:
            hidden = response_hidden(model, prompts, responses, self.device, self.packed, self.share_prompts)
            scores = Scores(hidden=hidden, weight=lm_head_weight(model, hidden.dtype), chunk_tokens=chunk)
        return select_rows(scores, keep).tempered(self.cfg.rollout.temperature)

    @torch.no_grad()
    def _teacher_scores(self, prompts: list[list[int]], responses: list[list[int]],
                        keep: torch.Tensor | None = None) -> Scores | None:
        kind = self.cfg.teacher.kind
        if self.cfg.loss.objective == "grpo":
            return None
        if kind == "live":
            return self._live_scores(prompts, responses, keep)
        if self.teacher_adapters is not None:
            with self.teacher_adapters.swapped_in(self.student):
                scores = self._scores(self.student, prompts, responses, keep)
        else:
            scores = self._scores(self.teacher, prompts, responses, keep)
        if kind == "trust_region":
            # Interpolate logits between the initial model and the current policy, both on the
            # teacher context: the teacher can move only as far as the rate lets it.
            rate = self.cfg.teacher.update_rate
            live = self._live_scores(prompts, responses, keep)
            if scores.logits is not None:
                return Scores(logits=torch.lerp(scores.logits.float(), live.logits.float(), rate))
            # (1-r) W0 h0 + r W1 h1 = [(1-r) h0, r h1] @ [W0, W1]^T: still one chunkable projection.
            return Scores(hidden=torch.cat([(1 - rate) * scores.hidden.float(), rate * live.hidden.float()], dim=-1),
                          weight=torch.cat([scores.weight.float(), live.weight.float()], dim=-1), chunk_tokens=scores.chunk_tokens)
        return scores

    def _live_scores(self, prompts: list[list[int]], responses: list[list[int]], keep: torch.Tensor | None) -> Scores:
        """The current policy as the teacher; LoRA: without adapter dropout (the teacher is not trained)."""
        if self.lora is None or not self.lora.dropout:
            return self._scores(self.student, prompts, responses, keep)
        self.student.eval()
        try:
            return self._scores(self.student, prompts, responses, keep)
        finally:
            self.student.train()

    def train_step(self, micros: list[list[TrainSample]], totals: Totals) -> dict[str, float]:
        """``train_batch`` of a batch that is one mini-batch."""
        return self.train_batch([(micros, totals)])

    def train_batch(self, minis: list[tuple[list[list[TrainSample]], Totals]]) -> dict[str, float]:
        """One generation batch: ``updates_per_batch`` passes over its mini-batches, one optimizer
        step per mini-batch. ``minis`` holds this rank's share of each mini-batch, already cut into
        micro-batches (as many on every rank), with that mini-batch's totals. Returns sums (and
        last-step scalars) for the driver to combine over ranks."""
        cfg = self.cfg
        self.student.train()
        updates = cfg.optimizer.updates_per_batch
        steps = updates * len(minis)
        # Every mini-batch's entropy mask and, past the first step, its off-policy baseline come from
        # the policy before this batch's first step (the rollout policy), as in the authors' code.
        # The first mini-batch's baseline is its own first forward, so it needs no extra pass.
        pre = [self._pre_pass(micros, logps=steps > 1 and j > 0) for j, (micros, _) in enumerate(minis)]
        sums: dict[str, float] = {}
        stepped = False
        for _ in range(updates):
            for (micros, totals), (masks, old_logps) in zip(minis, pre):
                for m, micro in enumerate(micros):
                    responses = [s.response_ids for s in micro]
                    keep = model_token_rows(micro, self.device)
                    teacher = self._teacher_scores([s.teacher_prompt_ids for s in micro], responses, keep)
                    student = self._scores(self.student, [s.prompt_ids for s in micro], responses, keep)
                    mb = self._tensors(micro)
                    loss, stats = micro_batch_loss(cfg.loss, student, teacher, mb, old_logps[m], totals, masks[m])
                    if old_logps[m] is None and steps > 1:
                        # Later steps measure how far the policy moved from these, the pre-update log-probs.
                        with torch.no_grad():
                            old_logps[m] = student.token_logprobs(mb.sampled)
                    # `micro_batch_loss` divides by batch-wide totals; FSDP averages gradients over
                    # ranks, so scaling by the world size makes the result a sum over ranks.
                    (loss * self.world_size).backward()
                    stats.update(loss=loss.item(), tokens=float(mb.sampled.numel()))
                    for key, value in stats.items():
                        # Losses: the mean over optimizer steps. Token sums: per pass over the batch.
                        sums[key] = sums.get(key, 0.0) + value / (steps if key in _PER_STEP else updates)
                step_stats = self._optimizer_step()
                stepped = stepped or not step_stats["skipped_step"]
                sums.update(step_stats)
        if cfg.teacher.update_every == "batch" and stepped:
            self._update_teacher()
        return sums

    def _tensors(self, micro: list[TrainSample]) -> MicroBatch:
        # The model's tokens only: an episode's observation tokens are context, not predictions (SPEC 2a).
        responses = [s.response_ids if s.loss_mask is None else [t for t, m in zip(s.response_ids, s.loss_mask) if m]
                     for s in micro]
        return MicroBatch(
            sampled=torch.tensor([t for r in responses for t in r], device=self.device),
            seq_index=torch.repeat_interleave(torch.arange(len(micro)), torch.tensor([len(r) for r in responses])).to(self.device),
            rollout_logp=torch.tensor([lp for s in micro for lp in s.rollout_logprobs], device=self.device),
            sd_mask=torch.tensor([s.sd_mask for s in micro], dtype=torch.float32, device=self.device),
            advantage=torch.tensor([s.advantage for s in micro], dtype=torch.float32, device=self.device),
            success=torch.tensor([s.success for s in micro], dtype=torch.float32, device=self.device),
        )

    @torch.no_grad()
    def _pre_pass(self, micros: list[list[TrainSample]], logps: bool) -> tuple[list, list]:
        """Per micro-batch: the mask keeping the response tokens whose student entropy is in the
        (mini-)batch's top ``top_entropy_quantile`` (entropies gathered over all ranks, so the
        threshold is the whole batch's however it is split), and, with ``logps``, the student's
        log-prob of each sampled token. One no-grad forward each, and none when neither is needed."""
        quantile = self.cfg.loss.top_entropy_quantile
        if quantile == 1.0 and not logps:
            return [None] * len(micros), [None] * len(micros)
        entropies, old = [], []
        for micro in micros:
            scores = self._scores(self.student, [s.prompt_ids for s in micro], [s.response_ids for s in micro],
                                  model_token_rows(micro, self.device))
            entropies.append(scores.entropy() if quantile < 1.0 else None)
            old.append(scores.token_logprobs(self._tensors(micro).sampled) if logps else None)
        if quantile == 1.0:
            return [None] * len(micros), old
        threshold = gather_entropy_threshold(torch.cat(entropies), quantile)
        return [top_entropy_mask(e, threshold) for e in entropies], old

    def _optimizer_step(self) -> dict[str, float]:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optimizer.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if self.cfg.teacher.update_every == "optimizer_step":
                self._update_teacher()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"grad_norm": grad_norm, "skipped_step": float(not finite), "lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def _update_teacher(self) -> None:
        if self.cfg.teacher.kind != "ema" or self._teacher_frozen or not self.cfg.has_separate_teacher:
            return  # frozen, trust_region and checkpoint teachers keep their weights; live has none
        rate = self.cfg.teacher.update_rate
        if self.teacher_adapters is not None:
            self.teacher_adapters.lerp_(self.student, rate)  # LoRA: the adapters are all that differ
            return
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t_local = t.to_local() if isinstance(t, DTensor) else t
            s_local = s.to_local() if isinstance(s, DTensor) else s
            t_local.lerp_(s_local.to(t_local.device), rate)  # an offloaded teacher keeps its shard in host memory

    # ---- the teacher guard's hands (sdpo/teacher_guard.py decides; each rank acts on its own shards,
    # so none of these is a collective)

    _teacher_frozen = False
    _teacher_copy: list[torch.Tensor] | None = None

    def _teacher_shards(self) -> list[torch.Tensor]:
        if (self.teacher is None and self.teacher_adapters is None) or self.cfg.teacher.kind != "ema":
            raise ValueError(f"the teacher guard acts on an EMA teacher; teacher.kind={self.cfg.teacher.kind!r} "
                             f"with loss.objective={self.cfg.loss.objective!r} has none")
        if self.teacher_adapters is not None:
            return self.teacher_adapters.shards()
        return [t.to_local() if isinstance(t, DTensor) else t for t in self.teacher.parameters()]

    def freeze_teacher(self) -> None:
        """Stop the EMA updates for the rest of this learner group's life."""
        self._teacher_shards()
        self._teacher_frozen = True

    @torch.no_grad()
    def snapshot_teacher(self) -> None:
        """Keep a host-memory copy of this rank's teacher shards: the last good teacher."""
        self._teacher_copy = [t.detach().to("cpu", copy=True) for t in self._teacher_shards()]

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Put the last snapshot back (the EMA then goes on from it)."""
        if self._teacher_copy is None:
            raise RuntimeError("reset_teacher before any snapshot_teacher: there is no good teacher to go back to")
        for t, saved in zip(self._teacher_shards(), self._teacher_copy):
            t.copy_(saved.to(t.device))

    @torch.no_grad()
    def response_logits(self, prompts: list[list[int]], responses: list[list[int]], teacher: bool = False) -> torch.Tensor:
        """Untempered logits predicting each response token, from the policy or the teacher, in eval
        mode: what a check that an engine (or an export) holds the learner's weights compares against.
        Every rank calls it with the same inputs (the forward gathers shards)."""
        if teacher and self.teacher is not None:
            model, context = self.teacher, contextlib.nullcontext()
        else:
            model, context = self.student, self._as_teacher(teacher)
        training = model.training
        model.eval()
        try:
            with context:
                return response_logits(model, prompts, responses, self.device).cpu()
        finally:
            model.train(training)

    def export_weights(self, directory: str, version: int, teacher: bool = False) -> str | None:
        """Full student (or teacher) weights as one file: every rank writes its own rows where they
        share a machine (shard_file.py), else rank 0 writes what every rank's gather brought it."""
        model = self.teacher if teacher else self.student  # no teacher model: _full_state says why
        writer = self._shard_writer(model) if self.lora is None and model is not None else None
        if writer is not None:
            return writer.write(directory, version, dtype=rollout_torch_dtype(self.cfg))
        state = self._full_state(teacher)
        # in the engines' dtype: a bf16 engine needs half the bytes of the fp32 master weights
        path = write_weights(state, directory, version, dtype=rollout_torch_dtype(self.cfg)) if self.rank == 0 else None
        dist.barrier()
        return path

    def _shard_writer(self, model: torch.nn.Module) -> ShardWriter | None:
        """Decided once per model, by every rank together (the first export is a collective anyway)."""
        if id(model) not in self._shard_writers:
            self._shard_writers[id(model)] = ShardWriter.for_model(model, self.rank, self.world_size)
        return self._shard_writers[id(model)]

    def _full_state(self, teacher: bool = False) -> dict[str, torch.Tensor] | None:
        """The student's (or teacher's) whole weights on rank 0; every rank joins the gathers. LoRA:
        base + adapters merged, for engines and folders that hold plain weights."""
        if teacher and self.teacher is None and self.teacher_adapters is None:
            raise ValueError(f"teacher.kind={self.cfg.teacher.kind!r} with loss.objective={self.cfg.loss.objective!r} "
                             "keeps no separate teacher weights")
        if self.lora is not None and (not teacher or self.teacher_adapters is not None):
            with self._as_teacher(teacher):
                return self._merged_state()
        return full_state(self.teacher if teacher else self.student, self.rank, self.world_size)

    def join_weight_group(self, backend: str, addr: str, port: int, world_size: int) -> None:
        """Rank 0 joins the engines' broadcast group (nccl transport); the others only gather."""
        if self.rank == 0:
            self._weight_group = join_weight_group(backend, addr, port, rank=0, world_size=world_size, device=self.device)

    def push_weights(self, transport: str, version: int, bucket_bytes: int, receivers_by_rank: list | None) -> dict[str, float]:
        """Stream the student's full weights to the engines in buckets (nccl / cuda_ipc). Every rank
        calls it: gathering each FSDP2 shard is a collective."""
        dtype = rollout_torch_dtype(self.cfg)
        tensors = self._merged(skip_tied=True) if self.lora is not None else iter_full_tensors(self.student)
        return push_weights(tensors, transport=transport, rank=self.rank, version=version,
                            bucket_bytes=bucket_bytes, device=self.device, group=getattr(self, "_weight_group", None),
                            receivers=receivers_by_rank[self.rank] if receivers_by_rank else None, dtype=dtype)

    def _merged(self, skip_tied: bool):
        return merged_full_tensors(self.student, self.lora.alpha / self.lora.rank, skip_tied=skip_tied)

    def _merged_state(self) -> dict[str, torch.Tensor] | None:
        """LoRA: the merged full state on rank 0 (host memory); the other ranks join each gather and keep nothing."""
        merged = self._merged(skip_tied=False)
        if self.rank == 0:
            return {name: t.cpu() for name, t in merged}
        for _ in merged:
            pass
        return None

    def _as_teacher(self, teacher: bool):
        """LoRA: the student's modules computing as the teacher (its adapters swapped in) when ``teacher``."""
        if not teacher:
            return contextlib.nullcontext()
        if self.teacher_adapters is None:
            raise ValueError(f"teacher.kind={self.cfg.teacher.kind!r} with loss.objective={self.cfg.loss.objective!r} "
                             "keeps no separate teacher weights")
        return self.teacher_adapters.swapped_in(self.student)

    def export_adapter(self, directory: str, teacher: bool = False) -> None:
        """LoRA: the policy's (or teacher's) adapters as a PEFT folder in ``directory`` (rank 0 writes)."""
        payload = self.adapter_payload(teacher, dtype=torch.float32)
        if self.rank == 0:
            write_adapter_folder(payload, directory)
        dist.barrier()

    def adapter_payload(self, teacher: bool = False, dtype: torch.dtype | None = None) -> dict | None:
        """LoRA: the policy's (or teacher's) adapters as a PEFT folder's files, in the engines' dtype
        unless ``dtype``; rank 0 returns them (every rank joins the gather)."""
        with self._as_teacher(teacher):
            state = adapter_state(self.student)
        if self.rank != 0:
            return None
        dtype = dtype or rollout_torch_dtype(self.cfg)
        return adapter_payload({k: v.to(dtype) for k, v in state.items()}, self.lora, self.model_path)

    def release_memory(self) -> None:
        """Give the blocks this rank's CUDA caching allocator holds back to the driver, for a
        colocated engine about to (re)allocate its weights and KV cache on the same GPU."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def save_checkpoint(self, directory: str) -> None:
        """Sharded student, optimizer and teacher through torch.distributed.checkpoint (each rank
        writes its own shards, nothing is gathered); scheduler and RNG states per rank."""
        dcp.save(self._checkpoint_state(), checkpoint_id=os.path.join(directory, "learner"))
        torch.save({"scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state()},
                   os.path.join(directory, f"rank{self.rank}.pt"))
        dist.barrier()

    def load_checkpoint(self, directory: str) -> None:
        state = self._checkpoint_state()
        dcp.load(state, checkpoint_id=os.path.join(directory, "learner"))
        set_state_dict(self.student, self.optimizer, model_state_dict=state["student"], optim_state_dict=state["optimizer"],
                       options=self._state_options())
        if self.teacher is not None:
            set_model_state_dict(self.teacher, state["teacher"])
        extra = torch.load(os.path.join(directory, f"rank{self.rank}.pt"), weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        dist.barrier()

    def _checkpoint_state(self) -> dict:
        student, optimizer = get_state_dict(self.student, self.optimizer, options=self._state_options())
        state = {"student": student, "optimizer": optimizer}
        if self.teacher is not None:  # the EMA teacher is state too: a resume must not reset it
            state["teacher"] = get_model_state_dict(self.teacher)
        if self.teacher_adapters is not None:  # LoRA: the teacher's adapter values (loaded in place)
            state["teacher_adapters"] = self.teacher_adapters.tensors
        return state

    def _state_options(self) -> StateDictOptions:
        # LoRA: the frozen base is the checkpoint at model.path, not state; only the adapters are
        # saved, and a load leaves the base as loaded (strict would call it missing)
        lora = self.lora is not None
        return StateDictOptions(ignore_frozen_params=lora, strict=not lora)

    def export_hf(self, directory: str) -> None:
        """The student's full weights as ``model.safetensors`` in ``directory`` (rank 0 writes); LoRA:
        the adapters merged into the base."""
        state = self._full_state()
        if self.rank == 0:
            os.makedirs(directory, exist_ok=True)
            save_file(savable(state), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def model_token_rows(micro: list[TrainSample], device: torch.device) -> torch.Tensor | None:
    """Which of a micro-batch's response positions hold the model's tokens (bool, one per response
    token), or None when all do (single-turn samples: nothing is selected, results stay bit-identical)."""
    if all(s.loss_mask is None for s in micro):
        return None
    return torch.tensor([bool(m) for s in micro for m in (s.loss_mask if s.loss_mask is not None else [1] * len(s.response_ids))],
                        device=device)


def select_rows(scores: Scores, keep: torch.Tensor | None) -> Scores:
    """The scores at the ``keep`` rows only (the episode's model tokens)."""
    if keep is None:
        return scores
    if scores.logits is not None:
        return Scores(logits=scores.logits[keep])
    return Scores(hidden=scores.hidden[keep], weight=scores.weight, chunk_tokens=scores.chunk_tokens)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
