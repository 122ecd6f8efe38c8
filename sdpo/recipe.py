"""Recipe loading: YAML file + ``dotted.key=value`` overrides -> a validated Config.

Every failure is a RecipeError whose message names the key and what would be valid, raised before
any actor starts.

Recipes are read with YAML 1.2's plain scalars rather than PyYAML's YAML 1.1 ones: only true/false
are booleans (so ``mixed_precision: no`` is the string "no", and ``wandb: yes`` still reaches the
boolean field as "yes", which the schema reads as true), numbers with a leading zero are not octal,
``1e-5`` is a float, and a key given twice in one mapping is an error, not "the last one wins".
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sdpo.config import Config


class RecipeError(ValueError):
    pass


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, second_line: int):
        super().__init__(f"the key {key!r} is given twice in one mapping, on line {first_line} and on line {second_line}")


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *defaults" is meant to be overridden by the keys next to it
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    break
        return super().construct_mapping(node, deep)


# PyYAML resolves plain scalars by YAML 1.1 (yes/no/on/off are booleans, 010 is octal 8, 1:30 is 90,
# 1e-5 is a string). Replace those resolvers with YAML 1.2 core-schema ones; null is the same in both.
_YAML11_ONLY = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"}
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+|0o[0-7]+)$"),
                                   list("-+0123456789"))
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: RecipeLoader, node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 16) if text.startswith("0x") else int(text)


RecipeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict[str, Any] = {}
    if recipe is not None:
        raw = _read_recipe(Path(recipe))
    for override in overrides:
        _apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_explain(err)) from None


def _read_recipe(path: Path) -> dict[str, Any]:
    name = repr(str(path))
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))[:5]
        raise RecipeError(f"recipe {name} is a directory; give a YAML file" + (f" in it, e.g. {path / found[0]} "
                          f"(it holds {', '.join(found)})" if found else ""))
    if not path.is_file():
        raise RecipeError(f"recipe {name} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"recipe {name} cannot be read: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RecipeError(f"recipe {name} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
                          f"(line {line}) cannot be decoded; save the file as UTF-8") from None
    try:
        raw = read_yaml(text)
    except _DuplicateKey as err:
        raise RecipeError(f"recipe {name}: {err}; keep one of them") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {name} is not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {name} must be a mapping of settings (key: value lines), got {type(raw).__name__}")
    return raw


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
        node[parts[-1]] = read_yaml(value) if value else ""
    except _DuplicateKey as err:
        raise RecipeError(f"override {override!r}: {err}") from None
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
            message = problem["msg"].removeprefix("Value error, ")
            # A check across keys names its keys itself: no "section:" or "(top level):" before it.
            lines.append(f"  {message}" if not problem["loc"] or message.startswith(key) else f"  {key}: {message}")
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
