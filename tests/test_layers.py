"""The direction of imports, as a rule a test keeps: every module's imports (top-level and inside
functions) are read with ast and checked against the edges below.

    environments/   no torch, no Ray, nothing from sdpo/ or models/ (a user can read and copy it alone)
    sdpo/           from environments/ only its public API (the package and environments/base.py),
                    never a specific environment; never models/ (built-ins are found by name)
    sdpo/learner/   nothing from the rollout side (sdpo.rollout), the verifiers or environments
    sdpo/rollout/   nothing from the learner side (sdpo.learner), the verifiers or environments
    models/         anything: a built-in model is trained on a specific environment's tasks
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (package the importing module is in, forbidden import prefix, why)
FORBIDDEN = [
    ("environments", "torch", "environments import no torch"),
    ("environments", "ray", "environments import no Ray"),
    ("environments", "sdpo", "environments know nothing of the trainer"),
    ("environments", "models", "environments know nothing of the built-in models"),
    ("sdpo", "models", "built-in models are found by name (sdpo.models.BUILT_IN), not imported"),
    ("sdpo.learner", "sdpo.rollout", "the learner knows nothing of the rollout engines"),
    ("sdpo.learner", "sdpo.env_pool", "the learner knows nothing of verification"),
    ("sdpo.learner", "environments", "the learner knows nothing of environments"),
    ("sdpo.rollout", "sdpo.learner", "the rollout engines know nothing of the learner"),
    ("sdpo.rollout", "sdpo.env_pool", "the rollout engines know nothing of verification"),
    ("sdpo.rollout", "environments", "the rollout engines know nothing of environments"),
]
ENVIRONMENTS_PUBLIC = {"environments", "environments.base"}

# Edges that break a rule and are tolerated for now; the test fails when one of them is gone too,
# so the list cannot go stale.
KNOWN_UNTIL_MERGE: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    found = {}
    for package in ("sdpo", "environments", "models"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: Path, known: set[str] = frozenset()) -> set[str]:
    """Every module ``module`` imports, absolute names (relative imports resolved); ``from pkg import
    name`` counts ``pkg.name`` too when that is one of the ``known`` modules."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names} & set(known)  # `from pkg import submodule`
    return names


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def broken_edges() -> list[tuple[str, str, str]]:
    broken, found = [], modules()
    for module, path in found.items():
        for name in sorted(imports(module, path, set(found))):
            for package, prefix, why in FORBIDDEN:
                if within(module, package) and within(name, prefix):
                    broken.append((module, name, why))
            if within(module, "sdpo") and within(name, "environments") and name not in ENVIRONMENTS_PUBLIC:
                broken.append((module, name, "sdpo/ uses only environments' public API, never a specific environment"))
    return broken


def test_imports_point_one_way():
    broken = broken_edges()
    unexpected = [f"{m} imports {n}: {why}" for m, n, why in broken if (m, n) not in KNOWN_UNTIL_MERGE]
    assert not unexpected, "\n".join(unexpected)
    gone = KNOWN_UNTIL_MERGE - {(m, n) for m, n, _ in broken}
    assert not gone, f"fixed, so delete from KNOWN_UNTIL_MERGE: {sorted(gone)}"


def test_the_rule_sees_function_level_and_relative_imports(tmp_path):
    source = ("from . import sibling\nfrom ..rollout import pool\n\n"
              "def f():\n    import ray\n    from environments.arithmetic import question\n")
    path = tmp_path / "worker.py"
    path.write_text(source)
    found = imports("sdpo.learner.worker", path, {"sdpo.learner.sibling"})
    assert {"sdpo.learner.sibling", "sdpo.rollout", "ray", "environments.arithmetic"} <= found
