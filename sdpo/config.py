"""Every setting of a run and its default, in one typed schema.

A recipe (YAML) overrides these defaults; ``key.sub=value`` on the command line overrides the
recipe. Unknown keys and wrong types are errors that name the key. Units live in the names.
"""

from __future__ import annotations

import difflib
import os
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    # extra="forbid": a misspelt key in a recipe is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherContextConfig(Section):
    """How each sample's teacher prompt is built from its group (SPEC section 2)."""

    success_threshold: float = Field(0.5, gt=0.0, le=1.0)  # rewards are in [0, 1] (environments.Verdict)
    dont_reprompt_on_self_success: bool = True
    remove_thinking_from_demonstration: bool = True
    include_environment_feedback: bool = True
    environment_feedback_only_without_solution: bool = True
    reprompt_template: str = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
    solution_template: str = "\nCorrect solution:\n\n{successful_previous_attempt}"
    feedback_template: str = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"
    # Where demonstrations come from: successful siblings (SDPO), the task's offline
    # `demonstration` field (SDFT), or both (a sibling when there is one, else the dataset's).
    demonstration_source: Literal["rollouts", "dataset", "both"] = "rollouts"
    # None: as many as the model's positions leave next to the response. A number is a cap of its
    # own; either way a teacher prompt never runs past the model's positions.
    max_teacher_prompt_tokens: int | None = Field(None, gt=0)
    # "left" drops the oldest tokens and so always keeps the assistant header the response is
    # scored after; "right" (what the reference code does) can cut that header off.
    teacher_truncation: Literal["left", "right", "error"] = "left"
    # Multi-turn episodes (SPEC 2a): a successful sibling's whole episode as a transcript in the
    # reprompt, only its final answer, or its turns as the conversation's next turns (then the question
    # again): the form a model knows from its own episodes, which small models copy from best.
    episode_demonstration: Literal["episode", "final_answer", "turns"] = "episode"

    @model_validator(mode="after")
    def _templates(self) -> "TeacherContextConfig":
        for key, allowed in TEMPLATE_FIELDS.items():
            template_problem(f"teacher_context.{key}", getattr(self, key), allowed)
        return self


# The placeholders each template is filled with (sdpo/teacher_context.py); any other one would be a
# KeyError in the first step that has a demonstration or feedback. The first of each is required:
# without it the teacher would lose the question, the demonstration or the feedback.
TEMPLATE_FIELDS = {"reprompt_template": ("prompt", "solution", "feedback"),
                   "solution_template": ("successful_previous_attempt",), "feedback_template": ("feedback_raw",)}


def template_problem(key: str, template: str, allowed: tuple[str, ...]) -> None:
    allowed_text = ", ".join("{%s}" % name for name in allowed)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:  # a lone "{" or "}"
        raise ValueError(f"{key}: {err}; write a literal brace as {{{{ or }}}} (placeholders: {allowed_text})") from None
    for field in fields:
        name = field.split(".")[0].split("[")[0]
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            raise ValueError(f"{key}: unknown placeholder {{{field}}}{hint}; the placeholders are {allowed_text} "
                             "(write a literal brace as {{ or }})")
        if field != name:
            raise ValueError(f"{key}: placeholder {{{field}}}: only plain names are filled in ({allowed_text})")
    if allowed[0] not in fields:
        raise ValueError(f"{key} has no {{{allowed[0]}}}: without it the teacher never sees what it is for "
                         f"(the placeholders are {allowed_text})")
    if key.endswith("reprompt_template") and not {"solution", "feedback"} & set(fields):
        raise ValueError(f"{key} has neither {{solution}} nor {{feedback}}: the teacher would see nothing the student did not")


class LossConfig(Section):
    """The objective: self-distillation (SPEC sections 3-4), GRPO (section 6), or both."""

    # sdpo: distill the teacher into the student; grpo: group-relative policy gradient with PPO
    # clipping; hybrid: sdpo + pg_weight * grpo; routed: grpo on the samples that succeeded, sdpo
    # on those that failed (one loss, SPEC section 6).
    objective: Literal["sdpo", "grpo", "hybrid", "routed"] = "sdpo"
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # 0 forward KL, 1 reverse KL, between: generalized JSD
    full_logit_distillation: bool = True  # False: the token-level estimator on sampled ids (alpha 1)
    topk: int | None = Field(100, gt=0)  # None: full vocabulary
    add_tail: bool = True
    rollout_is: bool = True  # truncated importance weight for rollout/learner mismatch
    rollout_is_cap: float = Field(2.0, gt=0.0)
    # The level the rollout IS ratio pi_learner / pi_rollout is taken at (SPEC section 9): "token"
    # (each token its own ratio), "sequence" (the product over the response: exact but high-variance),
    # "geometric" (exp of the mean log-ratio over the response). Truncated at rollout_is_cap either way.
    rollout_is_level: Literal["token", "sequence", "geometric"] = "token"
    # Masked IS: a token (or, at sequence/geometric level, a whole response) whose ratio is below
    # rollout_is_mask_low or above rollout_is_mask_high gets weight 0 instead of a truncated one.
    # None: no bound. For stale samples (rollout.max_staleness >= 1), where naive IS can collapse.
    rollout_is_mask_low: float | None = Field(None, ge=0.0)
    rollout_is_mask_high: float | None = Field(None, gt=0.0)
    # off-policy ratio cap when a batch takes several optimizer steps (updates_per_batch > 1 or
    # mini_batches_per_batch > 1); None: off
    is_clip: float | None = Field(2.0, gt=0.0)
    top_entropy_quantile: float = Field(1.0, gt=0.0, le=1.0)  # distill on the top-q student-entropy tokens
    aggregation: Literal["sequence_mean", "token_mean"] = "sequence_mean"
    chunk_tokens: int | None = Field(None, gt=0)  # divergence in chunks of this many tokens; None: at once
    # GRPO / hybrid
    clip_eps_low: float = Field(0.2, ge=0.0, lt=1.0)
    clip_eps_high: float = Field(0.28, ge=0.0)
    advantage_std_normalize: bool = True  # False: Dr.GRPO (mean-centred rewards only)
    pg_weight: float = Field(1.0, ge=0.0)  # hybrid: weight of the policy-gradient term


class LoraConfig(Section):
    """LoRA adapters as the trained policy (sdpo/learner/lora.py, PEFT): the base weights stay
    frozen and sharded, only the adapters are trained, averaged into the teacher and synced."""

    enabled: bool = False
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)  # the update is (alpha / rank) * B @ A
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on the adapter's input, while training only
    # Linear layers to adapt, by the last part of their module name (PEFT's target_modules). The
    # default is every projection of a Llama/Qwen-style decoder layer.
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    # What reaches the rollout engines after each step. "adapter": the adapters only (a few MB), which
    # the engines apply themselves (vLLM's LoRA support, the HF engine through PEFT); needs
    # rollout.max_staleness=0. "merged": base + adapters merged into full weights, sent by
    # rollout.weight_sync like a fully trained model (any engine, any transport).
    weight_sync: Literal["adapter", "merged"] = "merged"

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        if not value or any(not name or not isinstance(name, str) for name in value):
            raise ValueError(f"model.lora.target_modules must name at least one module, e.g. [q_proj, v_proj]; got {value!r}")
        embeddings = sorted({"embed_tokens", "lm_head"} & set(value))
        if embeddings:
            # the adapters live inside the decoder layers: a tied lm_head/embed_tokens adapter
            # would be one parameter in two places, which the merge and the engines cannot express
            raise ValueError(f"model.lora.target_modules: {embeddings} cannot take adapters here; adapt the decoder "
                             "layers' projections (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
        return value


class ModelConfig(Section):
    # "tiny-arithmetic" is the embedded default: a 0.59M-parameter Qwen2 warm-started on addition,
    # built locally on first use and cached. Anything else is a local directory or a hub name.
    path: str = Field("tiny-arithmetic", min_length=1)
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    # Extra arguments of the tokenizer's chat template, applied alike to student, teacher, eval and
    # probe prompts (sdpo/chat.py), e.g. {enable_thinking: false} for Qwen3 as the paper's runs set it.
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    lora: LoraConfig = Field(default_factory=LoraConfig)  # off by default: full fine-tuning

    @model_validator(mode="after")
    def _template_kwargs(self) -> "ModelConfig":
        reserved = {"tokenize", "return_dict", "add_generation_prompt", "conversation", "messages"} & set(self.chat_template_kwargs)
        if reserved:
            raise ValueError(f"model.chat_template_kwargs may not set {sorted(reserved)}: the framework sets them")
        return self


class EnvironmentConfig(Section):
    name: str = Field("environments.arithmetic:Arithmetic", min_length=1)  # "module.path:ClassName"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "test"
    workers: int = Field(1, ge=1)
    num_cpus_per_worker: float = Field(0.1, ge=0.0)
    timeout_s_per_call: float = Field(60.0, gt=0.0)  # one verify() call; past it the sample scores 0
    # A verify() call that raises, hangs, dies or returns no valid Verdict scores 0 with no teacher
    # signal. The run stops when that happens to every call of one round (a training step's rollouts,
    # or one evaluation; 4 calls or more), or to more than this fraction of the calls of the last
    # verifier_failure_window_rounds rounds. 1: never stop.
    max_verifier_failure_frac: float = Field(0.5, ge=0.0, le=1.0)
    verifier_failure_window_rounds: int = Field(5, ge=1)
    # Multi-turn environments (environments/multi_turn.py) only. An episode ends when the model
    # answers, after max_turns_per_episode model turns, or when its response (model and observation
    # tokens) reaches max_tokens_per_episode (None: rollout.max_response_tokens). One step() call
    # (a tool run) past tool_timeout_s ends the episode with reward 0 and feedback.
    max_turns_per_episode: int = Field(4, ge=1)
    max_tokens_per_episode: int | None = Field(None, gt=0)
    tool_timeout_s: float = Field(30.0, gt=0.0)


class RolloutConfig(Section):
    engine: Literal["auto", "vllm", "hf"] = "auto"  # auto: vLLM when importable, else HF generate
    replicas: int = Field(1, ge=1)
    samples_per_prompt: int = Field(8, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_response_tokens: int = Field(1024, gt=0)
    # The longest student prompt (chat template included). The engines' context is this plus
    # max_response_tokens (and, with the teacher probe on, room for teacher prompts), so a response
    # is never cut short by the context; a longer prompt is refused with an error naming this key.
    max_prompt_tokens: int = Field(1024, gt=0)
    max_model_len: int | None = Field(None, gt=0)  # engine context (prompt + response); None: derived, see above
    # auto: bfloat16 on cuda (what GPU inference runs in; the learner's fp32 log-probs are
    # reconciled by loss.rollout_is), float32 on cpu (bit-close to the learner, tested at 1e-4).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # KV cache. On CPU a size is required (vLLM-CPU would otherwise reserve most of the NUMA node):
    # None means CPU_KV_CACHE_GIB. On cuda, None lets the engine fill gpu_memory_utilization of the
    # GPU with cache after its weights (vLLM profiles it); a number pins the cache to that many GiB
    # and then overrides gpu_memory_utilization (vLLM 0.32, v1/worker/gpu_worker.py).
    kv_cache_gib: float | None = Field(None, gt=0.0)
    # cuda: the fraction of the GPU's memory one engine may take (weights, activations, KV cache).
    # None: GPU_MEMORY_UTILIZATION of the GPU when disaggregated; colocated, that times the engine's
    # share (num_gpus_per_replica), so that it always fits beside a learner that keeps to its own.
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)
    # None: eager on CPU (vLLM-CPU), CUDA graphs on cuda (faster decoding, a little start-up time).
    enforce_eager: bool | None = None
    num_cpus_per_replica: float = Field(0.4, ge=0.0)  # 2 replicas + 2 learner ranks + a verifier fit 2 CPUs
    num_gpus_per_replica: float = Field(0.0, ge=0.0)
    torch_threads_per_replica: int = Field(2, ge=1)
    # GPU only: "colocated" shares each GPU with a learner rank (the engine sleeps while the learner
    # trains); "disaggregated" gives rollout replicas GPUs of their own. Ignored on CPU.
    placement: Literal["colocated", "disaggregated"] = "disaggregated"
    # How new weights reach the engines: "shm" (a safetensors file in /dev/shm: every replica on
    # learner rank 0's node), "nccl" (bucketed broadcast from learner rank 0 over NCCL; disaggregated
    # GPUs; on CPU the same protocol runs over gloo, which also serves CPU clusters of several nodes),
    # "cuda_ipc" (bucketed CUDA IPC handles; colocated GPUs). "auto": shm on CPU, else by placement.
    weight_sync: Literal["auto", "shm", "nccl", "cuda_ipc"] = "auto"
    weight_sync_bucket_mib: int = Field(256, gt=0)  # nccl / cuda_ipc: bytes in flight per bucket
    # nccl: an engine waiting for a bucket longer than this raises (the sender died mid-transfer)
    # instead of hanging; the replica is then replaced.
    weight_sync_timeout_s: float = Field(600.0, gt=0.0)
    max_replica_restarts: int = Field(3, ge=0)  # a dead replica is replaced at most this often per run
    # Asynchronous training (sdpo/async_rollout.py, SPEC section 9): how many policy versions older
    # than the learner's a batch may be. 0: synchronous (sample with the newest weights, sync every
    # step). K >= 1: the engines sample the next K batches while the learner trains, picking up the
    # newest weights between batches; disaggregated placement only.
    max_staleness: int = Field(0, ge=0)


# Derived rollout defaults (sdpo/placement.py applies them; `--dry-run` prints the result).
CPU_KV_CACHE_GIB = 1.0  # rollout.kv_cache_gib on CPU when unset
GPU_MEMORY_UTILIZATION = 0.9  # of a whole GPU; colocated engines get this times their num_gpus_per_replica


class TeacherConfig(Section):
    """Whose weights score the teacher context (SPEC section 5)."""

    # ema: theta_T <- (1 - rate) theta_T + rate theta after each step. trust_region: logits
    # (1 - rate) z_initial + rate z_student. frozen: the initial model. live: the current policy.
    # checkpoint: the model at `path`, never updated.
    kind: Literal["ema", "trust_region", "frozen", "live", "checkpoint"] = "ema"
    update_rate: float = Field(0.05, ge=0.0, le=1.0)
    path: str | None = None  # kind=checkpoint only
    # When the EMA teacher moves: once per generation batch, after its last optimizer step (the
    # authors' code), or after every optimizer step (TRL; with k steps per batch the effective rate
    # per batch is then 1 - (1 - rate)^k).
    update_every: Literal["batch", "optimizer_step"] = "batch"
    # Teacher guard (sdpo/teacher_guard.py), read from the teacher probe (eval.teacher_probe_every_steps):
    # when probe/teacher_success falls more than guard_margin below its best, warn; freeze the EMA
    # teacher for the rest of the run; or reset it to the last copy whose probe was within the margin.
    guard: Literal["off", "warn", "freeze", "reset"] = "off"
    guard_margin: float = Field(0.1, ge=0.0, le=1.0)  # in success fraction (0.1 = 10 points)


class OptimizerConfig(Section):
    lr: float = Field(1e-5, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)  # each in [0, 1), as AdamW requires
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    warmup_steps: int = Field(10, ge=0)  # linear warm-up (in optimizer steps), then the schedule
    # After warm-up: constant, or a decay towards min_lr_ratio * lr over the run's optimizer steps
    # (steps * updates_per_batch * mini_batches_per_batch; sdpo/learner/schedule.py)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    updates_per_batch: int = Field(1, ge=1)  # passes (epochs) over one generation batch (>1: off-policy)
    # Each pass splits the batch, in order, into this many disjoint mini-batches of whole prompt
    # groups, one optimizer step each: updates_per_batch * mini_batches_per_batch steps per batch.
    mini_batches_per_batch: int = Field(1, ge=1)

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"optimizer.betas must be two numbers, e.g. [0.9, 0.999], got {value!r}")
        return value

    @model_validator(mode="after")
    def _betas_range(self) -> "OptimizerConfig":
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"optimizer.betas[{i}] must be in [0, 1), got {beta} (AdamW's default is [0.9, 0.999])")
        return self


class LearnerConfig(Section):
    world_size: int = Field(2, ge=1)  # FSDP2 ranks
    samples_per_micro_batch: int = Field(8, ge=1)  # per rank; used when max_tokens_per_micro_batch is None
    # Padding-free packing: each micro-batch's sequences are concatenated into one row (attention kept
    # within each sample) and filled up to this many tokens in its longer forward (usually the
    # teacher's). Micro-batches are balanced over ranks. None: padded micro-batches of
    # samples_per_micro_batch. A single sample longer than the budget runs alone.
    max_tokens_per_micro_batch: int | None = Field(None, gt=0)
    # Packed rows only (sdpa_packed attention, the CPU default): samples of a micro-batch with identical
    # prompt ids share one copy of the prompt (a prompt's samples for the student, siblings shown the same
    # demonstration for the teacher); the same loss and gradients to float rounding, fewer tokens per
    # forward. Off, or under flash-attn: one copy per sample (sdpo/learner/micro_batches.py, shares_prompts).
    share_prompts: bool = True
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16 compute, fp32 master weights and reduction
    activation_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, ~1/3 more compute
    teacher_offload: bool = False  # keep the teacher's shards in host memory (FSDP2 CPU offload); GPU only
    num_cpus_per_rank: float = Field(0.5, ge=0.0)
    num_gpus_per_rank: float = Field(0.0, ge=0.0)
    torch_threads_per_rank: int = Field(1, ge=1)
    call_timeout_s: float = Field(3600.0, gt=0.0)  # a learner call (a step, a save) longer than this means a hung rank


class EvalConfig(Section):
    every_steps: int = Field(0, ge=0)  # 0: only before and after training
    max_tasks: int | None = Field(None, gt=0)  # None: the whole eval split
    samples_per_task: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    greedy: bool = True  # also report greedy (temperature 0) success
    # Teacher competence (sdpo/probe.py): the teacher answering from its own contexts on held-out tasks.
    teacher_probe_every_steps: int = Field(0, ge=0)  # 0: off
    teacher_probe_tasks: int = Field(32, ge=1)
    teacher_probe_samples: int = Field(4, ge=2)  # student samples per task, so siblings can teach


class LoggingConfig(Section):
    run_dir: str = Field("runs/{name}-{time}", min_length=1)  # "" would write the run into the current directory

    @field_validator("run_dir")
    @classmethod
    def _home(cls, value: str) -> str:
        return os.path.expanduser(value)  # "~/runs" is a home directory, not a folder named "~"
    console_every_steps: int = Field(10, ge=1)
    actor_logs: bool = False  # stream every actor's stdout/stderr (vLLM, Ray) into the console
    wandb: bool = False
    wandb_project: str = "sdpo"
    wandb_mode: Literal["online", "offline"] = "offline"
    tensorboard: bool = False  # event files in RUN_DIR/tensorboard; needs `pip install tensorboard`


class CheckpointConfig(Section):
    every_steps: int = Field(0, ge=0)  # also always at the last step; 0: only there
    keep_last: int = Field(2, ge=1)
    # auto: continue from the newest complete checkpoint in logging.run_dir when there is one (give
    # the run a fixed run_dir, without {time}, to resume by re-running the same command); never: start fresh.
    resume: Literal["auto", "never"] = "auto"
    # The final policy as a Hugging Face folder in RUN_DIR/final_model (with model.lora: the adapters
    # merged into the base; the adapters themselves always go to RUN_DIR/final_adapter, PEFT format).
    export_hf: bool = True
    max_learner_restarts: int = Field(2, ge=0)  # a dead learner rank: restart the group from the last checkpoint


class RayConfig(Section):
    address: str | None = None  # None: $RAY_ADDRESS if set (ray job submit), else a local cluster
    num_cpus: int | None = Field(None, ge=1)  # local cluster size; None: all cores


class Config(Section):
    name: str = "sdpo"
    seed: int = 0
    steps: int = Field(100, ge=0)
    prompts_per_step: int = Field(32, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    model: ModelConfig = Field(default_factory=ModelConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    teacher_context: TeacherContextConfig = Field(default_factory=TeacherContextConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.rollout.samples_per_prompt

    @property
    def has_separate_teacher(self) -> bool:
        """Whether the learner keeps teacher weights apart from the student's: not for a live
        teacher (the current policy) nor for GRPO (no teacher at all)."""
        return self.loss.objective != "grpo" and self.teacher.kind != "live"

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        samples, ranks = self.samples_per_step, self.learner.world_size
        if samples % ranks:
            raise ValueError(
                f"prompts_per_step * rollout.samples_per_prompt = {samples} must be divisible by "
                f"learner.world_size = {ranks} (every FSDP rank takes the same number of samples)"
            )
        loss = self.loss
        if not loss.full_logit_distillation and loss.alpha != 1.0 and loss.objective != "grpo":
            raise ValueError(f"loss.full_logit_distillation=false (token-level estimator) needs loss.alpha=1, got {loss.alpha}")
        if (self.teacher.kind == "checkpoint") != (self.teacher.path is not None):
            raise ValueError("teacher.path is required with teacher.kind=checkpoint, and only then "
                             f"(got kind={self.teacher.kind!r}, path={self.teacher.path!r})")
        self._check_training_sampling()
        self._check_mini_batches()
        self._check_teacher_guard()
        self._check_async()
        self._check_lora()
        if loss.objective != "sdpo" and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"loss.objective={loss.objective} compares samples within a group: "
                             "rollout.samples_per_prompt must be >= 2")
        from sdpo.weight_sync import resolve_weight_sync

        resolve_weight_sync(self.rollout.weight_sync, self.rollout.placement, self.device)  # raises on what cannot work
        if self.device == "cuda" and self.model.attn_implementation == "flash_attention_2" and self.learner.mixed_precision != "bf16":
            # flash-attn kernels take fp16/bf16 only; learner.mixed_precision=no computes in fp32
            raise ValueError("model.attn_implementation=flash_attention_2 needs learner.mixed_precision=bf16 (flash-attn "
                             "rejects fp32 inputs); set learner.mixed_precision=bf16, or attn_implementation=sdpa/auto")
        context = self.teacher_context
        if (loss.objective == "sdpo" and self.rollout.samples_per_prompt == 1 and context.demonstration_source == "rollouts"
                and not context.include_environment_feedback):
            raise ValueError("rollout.samples_per_prompt=1 with loss.objective=sdpo: a sample has no sibling to learn "
                             "from and teacher_context.include_environment_feedback=false, so the teacher never sees "
                             "anything the student did not (loss 0 every step). Use samples_per_prompt >= 2, "
                             "environment feedback, or dataset demonstrations (teacher_context.demonstration_source=dataset)")
        if self.device == "cpu":
            if self.model.attn_implementation == "flash_attention_2":
                raise ValueError("model.attn_implementation=flash_attention_2 needs device=cuda; use sdpa or auto")
            if self.rollout.num_gpus_per_replica or self.learner.num_gpus_per_rank:
                raise ValueError("device=cpu but rollout.num_gpus_per_replica / learner.num_gpus_per_rank > 0")
        else:
            if self.learner.num_gpus_per_rank <= 0:
                raise ValueError("device=cuda needs learner.num_gpus_per_rank > 0 (e.g. 1)")
            if self.rollout.num_gpus_per_replica <= 0:
                raise ValueError("device=cuda needs rollout.num_gpus_per_replica > 0 (e.g. 1)")
        return self

    def _check_training_sampling(self) -> None:
        if not self.steps:
            return  # evaluation only: nothing is trained on the samples
        if self.rollout.temperature <= 0:
            raise ValueError("rollout.temperature must be > 0 for training (the learner divides logits by it); "
                             "greedy decoding is for evaluation (eval.greedy)")
        if self.rollout.top_p < 1:
            # The engines return log-probs renormalized over the nucleus, but the learner scores the
            # full (tempered) distribution: the IS weights and the divergence would not match what was sampled.
            raise ValueError(f"rollout.top_p={self.rollout.top_p} < 1 is not supported for training: the learner does "
                             "not apply the nucleus (it scores the full tempered distribution); set rollout.top_p=1")

    def _check_mini_batches(self) -> None:
        k, samples, ranks = self.optimizer.mini_batches_per_batch, self.samples_per_step, self.learner.world_size
        if k == 1:
            return
        if self.prompts_per_step % k:
            raise ValueError(f"optimizer.mini_batches_per_batch={k} must divide prompts_per_step={self.prompts_per_step} "
                             "(each mini-batch holds whole prompt groups)")
        if (samples // k) % ranks:
            raise ValueError(f"each of the optimizer.mini_batches_per_batch={k} mini-batches holds {samples // k} samples, "
                             f"which must be divisible by learner.world_size = {ranks}")

    def _check_lora(self) -> None:
        lora = self.model.lora
        if lora.enabled and lora.weight_sync == "adapter" and self.rollout.max_staleness:
            raise ValueError(f"model.lora.weight_sync=adapter with rollout.max_staleness={self.rollout.max_staleness}: "
                             "asynchronous rollouts pick up weight files between batches, which adapter-only sync does "
                             "not write; use model.lora.weight_sync=merged, or max_staleness=0")

    def _check_async(self) -> None:
        loss, k = self.loss, self.rollout.max_staleness
        low, high = loss.rollout_is_mask_low, loss.rollout_is_mask_high
        if low is not None and high is not None and low >= high:
            raise ValueError(f"loss.rollout_is_mask_low={low} must be below loss.rollout_is_mask_high={high}")
        if k and self.device == "cuda" and self.rollout.placement == "colocated":
            raise ValueError(f"rollout.max_staleness={k} overlaps generation with learning, but rollout.placement="
                             "colocated puts the engines to sleep while the learner trains on the same GPUs: use "
                             "rollout.placement=disaggregated (rollout GPUs apart from learner GPUs), or max_staleness=0")

    def _check_teacher_guard(self) -> None:
        teacher = self.teacher
        if teacher.guard == "off":
            return
        if not self.eval.teacher_probe_every_steps:
            raise ValueError(f"teacher.guard={teacher.guard} reads the teacher probe: set eval.teacher_probe_every_steps > 0")
        if teacher.guard in ("freeze", "reset") and (teacher.kind != "ema" or self.loss.objective == "grpo"):
            raise ValueError(f"teacher.guard={teacher.guard} acts on an EMA teacher's weights; it needs teacher.kind=ema "
                             f"and a distilling objective (got kind={teacher.kind}, objective={self.loss.objective}); "
                             "use teacher.guard=warn")
