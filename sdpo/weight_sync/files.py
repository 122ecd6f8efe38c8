"""Hand full weights from the learner to rollout engines through a safetensors file.

On one machine the file lives in /dev/shm (RAM), so a push costs a memory copy, not disk I/O.
Engines get the path (tensors cannot travel through vLLM's collective_rpc).
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_PATTERN = re.compile(r"weights-v(\d+)\.safetensors$")


def default_weights_dir(run_name: str) -> str:
    """A directory for this run's weight files: /dev/shm when it exists, else the temp dir.

    It holds the user, the run name and this process id, so concurrent runs never collide; call it
    once (in the driver) and pass the result to whoever writes and reads."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_name) or "run"
    return os.path.join(base, f"sdpo-{getpass.getuser()}-{safe_name}-{os.getpid()}")


def savable(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that own their storage: safetensors refuses tensors that share
    memory (tied embeddings: embed_tokens and lm_head are one tensor) or are views of a larger one."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state_dict.items():
        t = tensor.detach()
        if hasattr(t, "full_tensor"):
            raise TypeError(f"{name} is a DTensor: gather full tensors first (full_state_dict=True)")
        t = t.to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def write_weights(state_dict: dict[str, torch.Tensor], directory: str, version: int,
                  dtype: torch.dtype | None = None) -> str:
    """Save `state_dict` (full, HF names) to <directory>/weights-v{version}.safetensors atomically,
    delete older versions there, and return the path. `dtype`: floating tensors are cast to it
    first (the engines' dtype: an 8B model is 16 GB in bf16 instead of 32 GB in fp32)."""
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    os.makedirs(directory, exist_ok=True)
    path = weights_path(directory, version)
    # Readers must never see a half-written file: write under a temporary name, then rename.
    tmp = os.path.join(directory, f".weights-v{version}.safetensors.{os.getpid()}.tmp")
    save_file(savable(state_dict), tmp, metadata=file_metadata(version))
    publish(tmp, path, version)
    return path


def weights_path(directory: str, version: int) -> str:
    return os.path.join(directory, f"weights-v{version}.safetensors")


def file_metadata(version: int) -> dict[str, str]:
    return {"format": "pt", "sdpo_version": str(version)}


def publish(tmp: str, path: str, version: int) -> None:
    """Rename a finished file into place (readers see all of it or nothing) and delete older versions."""
    os.replace(tmp, path)
    for old in glob.glob(os.path.join(os.path.dirname(path), "weights-v*.safetensors")):
        match = _PATTERN.search(os.path.basename(old))
        if match and int(match.group(1)) < version:
            # an engine still reading it keeps its open mapping: unlink does not pull the data away
            os.remove(old)


# safetensors' dtype names (the header's "dtype" field)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def read_header(f) -> tuple[int, dict]:
    """(where the data starts, the header's entries without its metadata) of an open safetensors
    file: an 8-byte little-endian length, then that many bytes of JSON."""
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def encode_header(entries: dict, version: int) -> bytes:
    """A safetensors header for ``entries`` (name -> dtype, shape, data_offsets) with this module's
    metadata, padded so the data starts 8-byte aligned, as safetensors writes it."""
    text = json.dumps({"__metadata__": file_metadata(version), **entries}, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def read_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A safetensors file's tensors, in file order, as views of one private memory map of it: nothing
    is copied until the reader copies (safetensors' `get_tensor` copies each tensor first, which took
    a tenth of an engine's in-place load of the quickstart model). Files this cannot map as they
    are (another dtype, a misaligned tensor) are read by safetensors."""
    with open(path, "rb") as f:
        start, header = read_header(f)
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    if any(e["dtype"] not in SAFETENSORS_DTYPES or (start + e["data_offsets"][0]) % SAFETENSORS_DTYPES[e["dtype"]].itemsize
           for _, e in entries):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name, _ in entries:
                yield name, f.get_tensor(name)
        return
    data = torch.from_file(path, shared=False, size=os.path.getsize(path), dtype=torch.uint8)  # MAP_PRIVATE: never written back
    for name, e in entries:
        first, end = e["data_offsets"]
        yield name, data[start + first : start + end].view(SAFETENSORS_DTYPES[e["dtype"]]).view(e["shape"])
