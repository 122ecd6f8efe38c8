"""Recipe loading: YAML file + ``dotted.key=value`` overrides -> a validated Config.

Every failure is a RecipeError whose message names the key and what would be valid, raised before
any actor starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sdpo.config import Config


class RecipeError(ValueError):
    pass


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe {str(path)!r} must be a mapping of settings, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_explain(err)) from None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r} must look like dotted.key=value, e.g. loss.alpha=1.0")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or a section left empty in the YAML ("eval:")
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise RecipeError(f"override {override!r}: {part!r} is a value, not a section")
        node = child
    # YAML typing, so that steps=5 is an int, loss.topk=null is None and kwargs={a: 1} is a dict.
    try:
        node[parts[-1]] = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise RecipeError(f"override {override!r}: the value is not valid YAML ({problem}); quote it, "
                          "e.g. key='a: b', or close the brackets, e.g. environment.kwargs={feedback: true}") from None


def _explain(err: ValidationError) -> str:
    lines = ["invalid recipe:"]
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            section = _section_at(problem["loc"][:-1])
            valid = list(section.model_fields) if section else []
            close = difflib.get_close_matches(str(problem["loc"][-1]), valid, n=1, cutoff=0.6)
            lines.append(f"  {key}: unknown key; valid keys here: {', '.join(valid) or '?'}")
            if close:
                lines.append(f"    did you mean {'.'.join(map(str, problem['loc'][:-1] + (close[0],)))}?")
        elif problem["type"] == "value_error":
            lines.append(f"  {key}: {problem['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
