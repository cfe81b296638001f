"""Recipes: one YAML file describes one reproducible run, distill -> export -> fidelity -> bench -> package.

``load_recipe(path)`` reads a recipe (following ``extends:``) into a typed :class:`Recipe`;
every unknown key, wrong type or bad unit is a :class:`~edgekit.errors.RecipeError` that
names the file and the dotted key. :func:`edgekit.validate.validate_recipe` goes further
(device, schemes, runtimes, memory budget, data files) without running anything heavy.

Every default has one home, the stage configs (torch-free modules: ``distill/config.py``,
``export/config.py``, ``quantize/config.py``, ``bench/config.py``). The recipe composes them:
``distill.data``, ``fidelity`` and ``bench`` are the stage configs themselves; ``distill`` speaks
in recipe words (``time_budget: 10m``, ``cache: none``) whose fields are the stage fields
(default, bounds and description taken from there, never copied), and
:meth:`Recipe.distill_config` / :meth:`Recipe.export_configs` build the stage configs.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, model_validator

from edgekit import registry
from edgekit.artifact import user_path
from edgekit.bench.config import BenchConfig
from edgekit.devices import load_device
from edgekit.distill.config import LOSSES, CacheConfig, DataConfig, DistillConfig, QatConfig, StudentSpec, TrainConfig
from edgekit.errors import RecipeError, validation_problem, yaml_problem
from edgekit.export.config import ExportConfig, exporter
from edgekit.models import resolve_teacher
from edgekit.plan import weight_budget
from edgekit.quantize.config import FidelityConfig
from edgekit.units import Duration

NOT_INHERITED = ("name", "description")  # per file: a child never takes its base's name


# --------------------------------------------------------------------------- schema


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _stage_field(config: type[BaseModel], name: str, description: str | None = None) -> Any:
    """A stage config's own field (its default and bounds) for a recipe key: the default keeps one home."""
    field = copy.copy(config.model_fields[name])
    if description is not None:
        field.description = description
    return field


class StudentShape(_Section):
    """An explicit student; the planner is not consulted (validate still checks it fits)."""

    layers: int = Field(ge=1, description="decoder layers")
    hidden_size: int = Field(ge=1, description="model width")
    intermediate_size: int = Field(ge=1, description="MLP width")
    heads: int = Field(ge=1, description="query heads")
    kv_heads: int = Field(ge=1, description="key/value heads (grouped-query attention)")

    @model_validator(mode="after")
    def _groups(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self


def _student_kind(v: Any) -> str:
    return "<auto>" if isinstance(v, str) else "<shape>"


Student = Annotated[Union[Annotated[Literal["auto"], Tag("<auto>")], Annotated[StudentShape, Tag("<shape>")]],
                    Discriminator(_student_kind)]


class DistillSection(_Section):
    """What ``edgekit distill`` runs, in recipe words; each key is the stage config's field (same default)."""

    student: Student = Field("auto", description="'auto': the planner sizes it for `device` at the first export's "
                                                 "format/quant and `context`; or {layers, hidden_size, "
                                                 "intermediate_size, heads, kv_heads}")
    target_decode_tok_s: float | None = Field(None, gt=0, description="auto only: also reach this predicted "
                                                                      "decode speed on the device")
    init: Literal["minitron", "random"] = _stage_field(StudentSpec, "init", "prune the teacher, or random weights")
    student_family: str | None = _stage_field(StudentSpec, "family", "the student's model family when it is not "
                                              "the teacher's (qwen2/qwen3 -> llama, mistral <-> llama)")
    data: DataConfig = Field(default_factory=DataConfig, description="the data stage's keys; sources are paths "
                                                                     "relative to the recipe file")
    loss: Literal[LOSSES] = _stage_field(TrainConfig, "loss", "distillation divergence")  # type: ignore[valid-type]
    temperature: float = _stage_field(TrainConfig, "temperature", "softmax temperature of the distillation loss")
    steps: int | None = _stage_field(TrainConfig, "steps", "optimizer steps (used when time_budget is null)")
    time_budget: Duration | None = Field(TrainConfig.model_fields["time_budget_s"].default,
                                         description="train for this wall-clock time instead, e.g. 10m")
    batch_size: int = _stage_field(TrainConfig, "batch_size", "sequences per optimizer step")
    lr: float = _stage_field(TrainConfig, "lr", "peak learning rate")
    cache: Literal["topk", "sampled", "none"] = Field(CacheConfig.model_fields["mode"].default,
                                                      description="teacher logit cache; none: teacher online")
    qat: QatConfig | None = _stage_field(DistillConfig, "qat", "quantization-aware last phase: {target: "
                                         "<format>-<quant> of an export, steps or time_budget_s, lr}; null: off")

    @model_validator(mode="after")
    def _length(self):
        if self.time_budget is not None:
            if "steps" in self.model_fields_set and self.steps is not None:
                raise ValueError("give steps or time_budget, not both; set the other to null")
            self.steps = None
        elif self.steps is None:
            raise ValueError("set steps (e.g. 200) or time_budget (e.g. 10m)")
        if self.target_decode_tok_s is not None and self.student != "auto":
            raise ValueError("target_decode_tok_s only applies to student: auto; drop it or let the planner size "
                             "the student")
        return self


class ExportSpec(_Section):
    format: str = Field(description="registered format: gguf, onnx or executorch")
    quant: str = Field(description="registered scheme of that format, e.g. q4_k_m, int4 (see `edgekit plan`)")
    calibrate: bool = _stage_field(ExportConfig, "calibrate")
    target: str | None = _stage_field(ExportConfig, "target", "quant auto only: a size ('90MB'), bits per weight "
                                      "('4.8bpw') or 'device' (what fits the device's memory budget beside the KV "
                                      "cache at this recipe's context); default: q4_k_m's size")


class PackageSection(_Section):
    formats: list[str] | None = Field(None, description="what to bundle: an exported format (its app bundle) or a "
                                      "bundle layout (ollama: each GGUF export with a Modelfile); null: an app bundle "
                                      "of every export")


class Recipe(_Section):
    """One reproducible run for one (device, teacher) pair."""

    name: str = Field("", description="default: the file stem")
    description: str = ""
    extends: str | None = Field(None, description="a base recipe, relative to this file; deep-merged, this file wins")
    teacher: str = Field("default", description="'default' (embedded), a folder, a .gguf or a hub id")
    device: str = Field(description="a profile name from devices/ or 'host'")
    context: int = _stage_field(StudentSpec, "context", "tokens the student is sized and packaged for")
    distill: DistillSection | None = Field(default_factory=DistillSection,
                                           description="null: skip distillation and export the teacher as is")
    exports: list[ExportSpec] = Field(min_length=1)
    fidelity: FidelityConfig | None = Field(default_factory=FidelityConfig)
    bench: BenchConfig | None = Field(default_factory=BenchConfig)
    package: PackageSection | None = Field(default_factory=PackageSection)

    _path: Path | None = PrivateAttr(None)

    @property
    def path(self) -> Path | None:
        return self._path

    def distill_config(self) -> DistillConfig:
        """The :class:`DistillConfig` this recipe's distillation runs."""
        d = self.distill
        if d is None:
            raise RecipeError(f"{self._where()}: distill is null, so this recipe exports the teacher as is and has "
                              "no distillation; give a distill section to distil a student")
        first = self.exports[0]
        student: dict = {"format": first.format, "quant": first.quant, "context": self.context, "init": d.init,
                         "family": d.student_family}
        if d.student == "auto":
            student.update(device=self.device, target_decode_tok_s=d.target_decode_tok_s)
        else:
            student.update(d.student.model_dump())
        raw = {
            "teacher": self.teacher,
            "student": student,
            "data": d.data.model_dump(),
            "cache": None if d.cache == "none" else {"mode": d.cache},
            "train": {"loss": d.loss, "temperature": d.temperature, "steps": d.steps,
                      "time_budget_s": d.time_budget, "batch_size": d.batch_size, "lr": d.lr},
            "qat": d.qat.model_dump() if d.qat else None,
        }
        try:
            return DistillConfig.model_validate(raw)
        except ValidationError as e:
            raise RecipeError(f"{self._where()}: distill: " + format_errors(e, None, {})) from e

    def _device_target(self, fmt: str, model: str) -> str:
        """``target: device``: the weight bytes that fit this recipe's device next to the KV cache, compute buffer
        and runtime overhead of ``model`` at the recipe's context (the planner's memory model), rounded down."""
        budget = weight_budget(resolve_teacher(model).arch, load_device(self.device), fmt, self.context)
        if budget <= 0:
            raise RecipeError(f"{self._where()}: target: device leaves no memory for weights on {self.device} at "
                              f"context {self.context}; lower the context or pick a larger device")
        return f"{int(budget / 1e5) / 10:.1f}MB"

    def export_configs(self, model: str = "default") -> list[ExportConfig]:
        """One :class:`ExportConfig` per ``exports`` entry, for ``model`` (the runner passes the student)."""
        out = []
        for i, e in enumerate(self.exports):
            if e.format not in exporter_formats():
                raise RecipeError(f"{self._where()}: exports.{i}.format: {no_exporter(e.format)}")
            try:
                target = self._device_target(e.format, model) if e.target == "device" else e.target
                out.append(ExportConfig(model=model, format=e.format, quant=e.quant, calibrate=e.calibrate,
                                        target=target,
                                        context=self.context if exporter(e.format).static_context else None,
                                        threads=self.bench.threads if self.bench else None))
            except (ValidationError, RecipeError) as err:
                msg = format_errors(err, None, {}) if isinstance(err, ValidationError) else str(err)
                raise RecipeError(f"{self._where()}: exports.{i}: {msg}") from err
        return out

    def _where(self) -> str:
        return f"recipe {self._path}" if self._path else f"recipe {self.name!r}"


def exporter_formats() -> tuple[str, ...]:
    """Formats the export stage can write: those with a registered exporter."""
    return tuple(registry.names(registry.EXPORTER))


def no_exporter(fmt: str) -> str:
    return (f"format {fmt} has no exporter; the planner can size a student for it, but edgekit cannot write it; "
            f"export {' or '.join(exporter_formats())} instead")


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise RecipeError(f"recipe {path} does not exist; check the path (recipes live in recipes/)") from e
    except IsADirectoryError as e:
        raise RecipeError(f"recipe {path} is a folder, not a YAML file; pass a recipe file such as "
                          "recipes/pi-5-8gb.yaml") from e
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror or e}; check the file's permissions") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}: {e.reason}); "
                          "re-save it as UTF-8") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path}: {yaml_problem(e)}; fix the YAML there") from e
    if raw is None:
        raise RecipeError(f"recipe {path} is empty; a recipe needs at least `device:` and `exports:` "
                          "(see recipes/README.md), or `extends:` a recipe that has them")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of keys to values, not a {type(raw).__name__}; "
                          "write `key: value` lines such as `device: pi-5-8gb` (see recipes/README.md)")
    return raw


def _absolutize(raw: dict, base: Path) -> dict:
    """Paths in a file are relative to that file: data sources, fidelity texts, a device profile .yaml, and a
    teacher folder or .gguf that exists."""
    distill = raw.get("distill")
    if isinstance(distill, dict) and isinstance(distill.get("data"), dict):
        sources = distill["data"].get("sources")
        if isinstance(sources, list):
            distill["data"]["sources"] = [str((base / user_path(s)).resolve()) if isinstance(s, str) else s
                                          for s in sources]
    fidelity = raw.get("fidelity")
    if isinstance(fidelity, dict) and isinstance(fidelity.get("texts"), list):
        fidelity["texts"] = [str((base / user_path(s)).resolve()) if isinstance(s, str) else s
                             for s in fidelity["texts"]]
    device = raw.get("device")
    if isinstance(device, str) and Path(device).suffix in (".yaml", ".yml"):  # a profile file, not a name
        raw["device"] = str((base / user_path(device)).resolve())
    teacher = raw.get("teacher")
    if isinstance(teacher, str) and teacher != "default":
        local = base / user_path(teacher)
        if teacher.startswith((".", "~", "/")) or local.exists():
            raw["teacher"] = str(local.resolve())
    return raw


def deep_merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: nested mappings merge key by key, anything else (lists, null) replaces."""
    out = dict(base)
    for k, v in child.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _record(origins: dict, raw: dict, path: Path, prefix: tuple = ()) -> None:
    for k, v in raw.items():
        origins[prefix + (k,)] = path
        if isinstance(v, dict):
            _record(origins, v, path, prefix + (k,))


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """The merged mapping of ``path`` and its bases, and which file set each key path."""
    path = path.resolve()
    if path in chain:
        names = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"recipe {chain[0]}: extends: circular chain {names}; remove one of these extends")
    raw = _absolutize(_read_yaml(path), path.parent)
    parent = raw.get("extends")
    merged, origins = {}, {}
    if parent is not None:
        if not isinstance(parent, str) or not parent.strip():
            raise RecipeError(f"recipe {path}: extends: expected one recipe file name such as base.yaml, got "
                              f"{parent!r}; a recipe extends a single base (that base may extend another)")
        target = user_path(path.parent / parent)
        if not target.is_file():
            raise RecipeError(f"recipe {path}: extends: {target} does not exist; the path is relative to {path.parent}")
        merged, origins = _load_raw(target, (*chain, path))
        for key in NOT_INHERITED:
            merged.pop(key, None)
    _record(origins, raw, path)
    return deep_merge(merged, raw), origins


def format_errors(err: ValidationError, path: Path | None, origins: dict) -> str:
    return "; ".join(_error_lines(err, path, origins))


def _is_tag(part: object) -> bool:
    """A segment pydantic adds to an error's location (``function-after[_check(), Recipe]``, ``<lambda>``)."""
    return isinstance(part, str) and (part.startswith("<") or re.fullmatch(r"[\w-]+\[.*\]", part) is not None)


def _user_loc(e: dict) -> tuple:
    """The keys of the recipe an error is about. The last segment of an unknown-key error is the user's own key,
    kept whatever characters it holds (a key ``a[b`` is not one of pydantic's tags)."""
    loc = tuple(e["loc"])
    last = loc[-1:] if e["type"] == "extra_forbidden" else ()
    return tuple(p for p in loc[:len(loc) - len(last)] if not _is_tag(p)) + last


def _error_lines(err: ValidationError, path: Path | None, origins: dict) -> list[str]:
    errors = [(_user_loc(e), e) for e in err.errors()]
    suggested = set()  # a typo is one problem: `quantt` (unknown) does not also report `quant` as missing
    for loc, e in errors:
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1, cutoff=0.6)
            suggested.update(loc[:-1] + (c,) for c in close)
    lines = []
    for loc, e in errors:
        if e["type"] == "missing" and loc in suggested:
            continue
        key = ".".join(map(str, loc)) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            msg = ("unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
                   + (f"{' K' if close else '; k'}eys allowed here: {', '.join(known)}" if known else "")
                   + " (see recipes/README.md)" + _MISPLACED.get(loc, ""))
        elif e["type"] == "missing":
            msg = "required key is missing; add it (see recipes/README.md)"
        elif e["type"] in ("too_short",) and loc == ("exports",):
            msg = "give at least one export, e.g. [{format: gguf, quant: q4_k_m}]"
        else:
            msg = _explain(e, loc)
        source = path
        for n in range(len(loc), 0, -1):
            if loc[:n] in origins:
                source = origins[loc[:n]]
                break
        lines.append((f"{source}: " if source else "") + f"{key}: {msg}")
    return lines


_MISPLACED = {("memory_budget",): "; a memory budget belongs to the device: set memory_budget in a device profile "
                                   "(devices/*.yaml) and point `device:` at it",
              ("time_budget",): "; it is a distill key: write it under distill:"}


def _explain(e: dict, loc: tuple) -> str:
    """pydantic's message plus the value that was given and the fix (with the key's default as an example)."""
    example = _default(loc)
    return validation_problem(e, f"{loc[-1]}: {example}" if example is not None and isinstance(loc[-1], str) else None)


def _default(loc: tuple):
    """The schema default of the field at ``loc`` when it is a plain number or word (for examples), else None."""
    model: Any = Recipe
    field = None
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        nested = [a for a in _flatten(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = nested[0] if nested else None
    value = getattr(field, "default", None)
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) and value != "" else None


def _known_keys(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        nested = [a for a in _flatten(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(getattr(model, "model_fields", {}))


def _flatten(ann) -> list:
    args = typing.get_args(ann)
    if not args:
        return [ann]
    return [x for a in args for x in _flatten(a)]


def parse_recipe(path: Path) -> tuple[Recipe | None, dict, list[str]]:
    """(recipe or None, the merged mapping, schema problems). Raises RecipeError for unreadable files / extends."""
    path = Path(path)
    merged, origins = _load_raw(path)
    merged.pop("extends", None)
    merged.setdefault("name", path.stem)
    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as e:
        return None, merged, _error_lines(e, path.resolve(), origins)
    recipe.extends = _read_yaml(path.resolve()).get("extends")  # this file's own base, not the base's
    recipe._path = path.resolve()
    return recipe, merged, []


def load_recipe(path: str | Path) -> Recipe:
    """Read, merge (``extends``) and type-check a recipe; RecipeError names the file and key of every problem."""
    recipe, _, problems = parse_recipe(Path(path))
    if problems:
        raise RecipeError(f"recipe {Path(path)} is invalid: " + "; ".join(problems))
    return recipe
