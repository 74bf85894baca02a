"""Recipe files (YAML or JSON) -> a validated pipeline spec, before any work is done.

A recipe is::

    passes:                 # in order; each item is NAME or {NAME: {option: value}}
      - cleanup
      - prune: {sparsity: 0.5}
    gate:                   # optional thresholds checked after validation
      max_accuracy_drop: 0.01
    seed: 0                 # optional

Every error names the file, the path inside it and the problem, e.g.
``recipe.yaml: passes[1].prune.sparsity: must be < 1 (got 1.5)``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from onnxcomp.errors import OnnxcompError
from onnxcomp.gate import Gate
from onnxcomp.registry import get_pass

if TYPE_CHECKING:
    from onnxcomp.passes.base import PassConfig

__all__ = ["Gate", "Recipe", "PassStep", "load_recipe", "parse_recipe", "shipped_recipes"]


class _RecipeFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passes: list[Any] = Field(min_length=1)
    gate: Gate = Gate()
    seed: int = Field(0, ge=0)
    description: str = ""


@dataclasses.dataclass(frozen=True)
class PassStep:
    name: str
    config: PassConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: tuple[PassStep, ...]
    gate: Gate
    seed: int
    source: str
    description: str = ""

    def extras_needed(self) -> tuple[str, ...]:
        """The optional extras of onnxcomp its passes need (``train``: torch), sorted."""
        return tuple(sorted({extra for step in self.steps for extra in get_pass(step.name).extras_needed(step.config)}))


def load_recipe(recipe: str | os.PathLike | dict) -> Recipe:
    """A recipe from a dict, a YAML/JSON file path, or the name of a shipped recipe."""
    if isinstance(recipe, dict):
        return parse_recipe(recipe, "<recipe>")
    path = Path(recipe)
    if not path.is_file():
        shipped = shipped_recipes()
        if str(recipe) in shipped:
            path = shipped[str(recipe)]
        elif path.suffix in (".yaml", ".yml", ".json") or os.sep in str(recipe):
            raise OnnxcompError(f"{recipe}: no such recipe file")
        else:
            raise OnnxcompError(
                f"{recipe}: no such recipe file or shipped recipe (shipped: "
                f"{', '.join(sorted(shipped))})"
            )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxcompError(f"{path}: cannot read recipe ({exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except RecursionError:
        raise OnnxcompError(f"{path.name}: nested too deeply to be a recipe") from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).replace("\n", " ")[:200]
        raise OnnxcompError(f"{path.name}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None
    return parse_recipe(data, path.name)


def parse_recipe(data: Any, source: str) -> Recipe:
    """Validate recipe data; raise OnnxcompError naming ``source`` and the path."""
    if not isinstance(data, dict):
        raise OnnxcompError(f"{source}: a recipe must be a mapping with a 'passes' list")
    try:
        spec = _RecipeFile(**data)
    except ValidationError as exc:
        raise OnnxcompError(_format_error(source, exc)) from None
    except RecursionError:
        raise OnnxcompError(f"{source}: nested too deeply to be a recipe") from None
    steps = []
    for index, item in enumerate(spec.passes):
        where = f"{source}: passes[{index}]"
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, options = next(iter(item.items()))
            options = {} if options is None else options
            if not isinstance(options, dict):
                raise OnnxcompError(f"{where}.{name}: options must be a mapping (got {options!r})")
        else:
            raise OnnxcompError(f"{where}: expected a pass name or {{name: {{options}}}} (got {item!r})")
        cls = get_pass(str(name), where)
        try:
            config = cls.Config(**options)
        except ValidationError as exc:
            raise OnnxcompError(_format_error(f"{source}", exc, prefix=f"passes[{index}].{name}")) from None
        steps.append(PassStep(str(name), config))
    return Recipe(tuple(steps), spec.gate, spec.seed, source, spec.description)


def shipped_recipes() -> dict[str, Path]:
    """Recipes that ship with the package, by name (file stem)."""
    root = importlib.resources.files("onnxcomp.recipes")
    found = {}
    for entry in root.iterdir():
        if entry.name.endswith((".yaml", ".yml")):
            found[entry.name.rsplit(".", 1)[0]] = Path(str(entry))
    return found


_MESSAGES = {
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "extra_forbidden": "unknown option",
    "missing": "required option is missing",
    "literal_error": "must be one of {expected}",
    "too_short": "must not be empty",
    "value_error": "{error}",
}


def _format_error(source: str, exc: ValidationError, prefix: str = "") -> str:
    """First pydantic error as 'source: path: problem (got value)'."""
    err = exc.errors()[0]
    parts = [prefix] if prefix else []
    for loc in err["loc"]:
        if isinstance(loc, int):
            parts[-1:] = [f"{parts[-1]}[{loc}]"] if parts else [f"[{loc}]"]
        else:
            parts.append(str(loc))
    where = ".".join(parts)
    template = _MESSAGES.get(err["type"])
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in err.get("ctx", {}).items()}
    message = template.format(**ctx) if template else err["msg"][0].lower() + err["msg"][1:]
    if err["type"] == "extra_forbidden":
        got = ""
    elif err["type"] == "missing":
        got = ""
    else:
        got = f" (got {err['input']!r})"
    more = len(exc.errors()) - 1
    tail = f" [+{more} more]" if more else ""
    return f"{source}: {where}: {message}{got}{tail}"
