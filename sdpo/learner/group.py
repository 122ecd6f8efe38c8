"""The learner ranks as one object for the driver: placement, rendezvous, fan-out, reduction."""

from __future__ import annotations

import ray

from sdpo.batch import TrainSample
from sdpo.config import Config
from sdpo.learner.objective import Totals
from sdpo.learner.worker import LearnerWorker


class LearnerGroup:
    def __init__(self, cfg: Config, model_path: str):
        self.cfg = cfg
        actor = ray.remote(LearnerWorker)
        opts = dict(num_cpus=cfg.learner.num_cpus_per_rank, num_gpus=cfg.learner.num_gpus_per_rank)
        size = cfg.learner.world_size
        self.workers = [actor.options(**opts).remote(rank, size, cfg.model_dump_json(), model_path) for rank in range(size)]
        addr, port = ray.get(self.workers[0].rendezvous_address.remote())
        self.num_params = ray.get([w.setup.remote(addr, port) for w in self.workers])[0]

    def train_step(self, samples: list[TrainSample]) -> dict[str, float]:
        shards = balance(samples, len(self.workers))
        totals = Totals(sequences=len(samples), sd_tokens=sum(len(s.response_ids) for s in samples if s.sd_mask),
                        all_tokens=sum(len(s.response_ids) for s in samples))
        results = _get_all([w.train_step.remote(shard, totals) for w, shard in zip(self.workers, shards)])
        tokens = sum(r["tokens"] for r in results)
        extra = {f"learn/{k}": sum(r[k] for r in results) for k in ("sd_loss", "pg_loss") if k in results[0]}
        if "clip_frac" in results[0]:
            extra["learn/clip_frac"] = sum(r["clip_frac"] for r in results) / max(1.0, tokens)
        return {
            **extra,
            "learn/loss": sum(r["loss"] for r in results),
            "learn/grad_norm": results[0]["grad_norm"],
            "learn/skipped_step": results[0]["skipped_step"],
            "learn/lr": results[0]["lr"],
            "learn/rollout_logp_gap_abs": sum(r["logp_gap_abs"] for r in results) / max(1.0, tokens),
            "learn/is_weight_mean": sum(r["is_weight"] for r in results) / max(1.0, tokens),
            "learn/response_tokens": tokens,
        }

    def export_weights(self, directory: str, version: int, teacher: bool = False) -> str:
        paths = _get_all([w.export_weights.remote(directory, version, teacher) for w in self.workers])
        return paths[0]

    @property
    def has_separate_teacher(self) -> bool:
        """Whether the ranks hold teacher weights apart from the student's (not for a live teacher or GRPO)."""
        return self.cfg.loss.objective != "grpo" and self.cfg.teacher.kind != "live"

    def save_checkpoint(self, directory: str) -> None:
        _get_all([w.save_checkpoint.remote(directory) for w in self.workers])

    def load_checkpoint(self, directory: str) -> None:
        _get_all([w.load_checkpoint.remote(directory) for w in self.workers])

    def export_hf(self, directory: str) -> None:
        _get_all([w.export_hf.remote(directory) for w in self.workers])

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Leave the process group cleanly when every rank can, then kill the actors regardless
        (after a rank died, the others may be stuck in a collective that will never finish)."""
        ray.wait([w.shutdown.remote() for w in self.workers], num_returns=len(self.workers), timeout=timeout_s)
        for w in self.workers:
            ray.kill(w)


def _get_all(refs: list) -> list:
    """ray.get for a collective call: raises as soon as any rank fails, instead of waiting on
    ranks that block forever in a collective with the dead one."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)  # raises RayActorError / RayTaskError for a dead or failed rank
    return ray.get(refs)


def balance(samples: list[TrainSample], ranks: int) -> list[list[TrainSample]]:
    """Equal sample counts per rank (FSDP needs every rank to run the same number of forwards),
    with token counts evened out by dealing the longest samples first in snake order."""
    order = sorted(range(len(samples)), key=lambda i: -samples[i].num_tokens)
    shards: list[list[TrainSample]] = [[] for _ in range(ranks)]
    for position, index in enumerate(order):
        lap, offset = divmod(position, ranks)
        shards[offset if lap % 2 == 0 else ranks - 1 - offset].append(samples[index])
    return shards
