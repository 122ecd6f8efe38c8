"""Make pydantic importable on a bare GPU image (python3 + torch + transformers, no internet):
sdpo.config needs it, and the device machine does not have it. The wheels travel in
benchmarks/gpu/wheels/ (pydantic, pydantic-core for CPython 3.10-3.13 on x86-64 Linux,
annotated-types, typing-inspection, typing-extensions: ~9 MiB). They are unpacked, not installed,
into a directory that is printed for PYTHONPATH; nothing is printed when pydantic already imports.
Standard library only.

    export PYTHONPATH="$(python3 benchmarks/gpu/deps.py)${PYTHONPATH:+:$PYTHONPATH}"
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import zipfile

WHEELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wheels")


def wanted(path: str) -> bool:
    name = os.path.basename(path)
    if "-py3-none-any" in name:
        return True
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return f"-{tag}-{tag}-" in name


def main() -> None:
    try:
        import pydantic  # noqa: F401

        return
    except ImportError:
        pass
    wheels = [w for w in sorted(glob.glob(os.path.join(WHEELS, "*.whl"))) if wanted(w)]
    if not any(os.path.basename(w).startswith("pydantic_core-") for w in wheels):
        sys.exit(f"no pydantic-core wheel for Python {sys.version_info.major}.{sys.version_info.minor} in {WHEELS}: "
                 "pip download --no-deps --only-binary=:all: pydantic-core==<the version pydantic pins> there")
    target = os.path.join(tempfile.gettempdir(), f"sdpo-gpu-deps-py{sys.version_info.major}{sys.version_info.minor}")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    print(target)


if __name__ == "__main__":
    main()
