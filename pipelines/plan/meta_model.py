"""The model built from its config only, on PyTorch's ``meta`` device (shapes, no storage,
no weights read), with the recipe's method injected on it: its parameter tensors, how many
train, and the activations of one training step (:mod:`.activations`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .activations import ATTENTION, Activations, register_attention, step_activations
from .inputs import PlanError


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    architecture: str
    numels: tuple[tuple[int, bool], ...]  # (elements, trainable) per parameter tensor
    largest_module: int  # parameters one module owns directly (what ZeRO-3 gathers at once)
    base_params: int
    trainable: int
    trainable_source: str
    activations: Activations


def _hf_config(name: str):
    from transformers import AutoConfig

    from .. import models

    try:
        return AutoConfig.from_pretrained(models.resolve(name))
    except Exception as e:  # transformers raises OSError/ValueError/KeyError variously
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"model: cannot read the config of {name!r}: {first}") from None


def _meta_model(cfg, task: str, dtype, num_labels: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    register_attention()
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    kwargs = {"num_labels": num_labels} if task == "classification" else {}
    try:
        if kwargs:
            cfg.num_labels = num_labels
        with torch.device("meta"):
            return cls.from_config(cfg, dtype=dtype, attn_implementation=ATTENTION)
    except Exception as e:
        raise PlanError(f"model: transformers cannot build {cfg.model_type!r} for task "
                        f"{task!r}: {e}") from None


def _inject(model, method_cfg: Mapping[str, Any]):
    """``(PeftModel or None, method)``: the method on the meta model; None where the method
    must read weight values to inject (PaFi picks the smallest |W|)."""
    import peft_core
    from peft_core import targets

    try:
        pm = peft_core.apply(model, method_cfg)
        return pm, pm.method
    except NotImplementedError:
        # apply() fingerprints the base by sampling weight values, which meta tensors do not
        # have; do what apply does after that (freeze, train new heads, inject) by hand.
        pass
    config = peft_core.MethodConfig.from_dict(dict(method_cfg))
    method = peft_core.get(config.name)(config)
    model.requires_grad_(False)
    if config.train_head:
        for head in targets.new_task_heads(model):
            model.get_submodule(head).requires_grad_(True)
    try:
        method.inject(model)
    except NotImplementedError:
        return None, method
    return peft_core.PeftModel(model, method, {}), method


def _count(model, method_cfg: Mapping[str, Any]) -> tuple[Any, int, str, list[str]]:
    """(module to run forward on, trainable count, how it was counted, notes)."""
    import peft_core

    notes = []
    try:
        pm, method = _inject(model, method_cfg)
    except peft_core.PeftError as e:  # e.g. target modules this architecture does not have
        raise PlanError(f"train.method: {e}") from None
    formula = method.expected_trainable_params
    name = method.config.name
    if pm is None:
        if formula is None:
            raise PlanError(f"train.method: {name!r} reads weight values when it is injected and "
                            "documents no expected_trainable_params; it cannot be planned from a "
                            "config alone")
        notes.append(f"{name} chooses its weights from their values at injection: trainable count "
                     "from its expected_trainable_params, activations of the frozen base model "
                     "alone (an underestimate)")
        return model, int(formula(model)), "expected_trainable_params", notes
    counted = pm.summary()["trainable_params"]
    if formula is not None:
        # The documented count once training runs (SAM's mask exists only after prepare).
        expected = int(formula(pm.base_model))
        if expected != counted:
            notes.append(f"{name}: {counted:,} trainable at injection, {expected:,} once its "
                         "prepare pass has chosen them (planned with the latter; activations "
                         "as at injection, an underestimate)")
        return pm, expected, "expected_trainable_params", notes
    return pm, counted, "counted on the meta model", notes


def _activations(runner, task: str, micro: int, seq: int, **kw: Any) -> Activations:
    """The step's activations with the method, else of the base model alone (noted), else
    none (noted): a plan is still made when a method's forward cannot run on meta tensors."""
    try:
        return step_activations(runner, task, micro, seq, **kw)
    except Exception as e:  # a method's forward that needs real values
        try:
            acts = step_activations(getattr(runner, "base_model", runner), task, micro, seq, **kw)
            return dataclasses.replace(acts, note=f"activations of the base model alone: the "
                                       f"method's forward cannot run on an empty model ({e})")
        except Exception as e2:
            return Activations(0, 0, (), note=f"activations not estimated: {e2}")


def describe_model(name: str, method_cfg: Mapping[str, Any], *, task: str, micro: int,
                   seq: int, precision: str, num_labels: int = 2,
                   gradient_checkpointing: bool = False) -> tuple[ModelDescription, list[str]]:
    """Parameter counts and activation bytes of ``name`` with the method, from its config."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cfg = _hf_config(name)
    model = _meta_model(cfg, task, dtype, num_labels)
    largest_module = max((sum(p.numel() for p in m.parameters(recurse=False))
                          for m in model.modules()), default=0)
    base_params = sum(p.numel() for p in model.parameters())
    runner, trainable, source, notes = _count(model, method_cfg)
    numels = tuple((p.numel(), p.requires_grad) for p in model.parameters())
    if source == "expected_trainable_params":
        counted = sum(n for n, t in numels if t)
        if counted != trainable:
            # The extra trainable tensors appear in prepare; plan them as one more tensor.
            numels += ((trainable - counted, True),) if trainable > counted else ()
    grad_bytes = trainable * (2 if precision == "bf16" else 4)
    acts = _activations(runner, task, micro, seq, gradient_checkpointing=gradient_checkpointing,
                        grad_bytes=grad_bytes)
    if acts.note:
        notes.append(acts.note)
    arch = type(model).__name__
    return ModelDescription(arch, numels, largest_module, base_params, trainable, source,
                            acts), notes
