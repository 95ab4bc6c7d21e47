"""Reference points every search compares against: ``full`` fine-tuning and ``linear_probe``."""

from __future__ import annotations

import dataclasses

from torch import nn

from .. import partition, targets
from ..config import MethodConfig
from ..errors import TargetError
from ..method import Method
from ..registry import register


@dataclasses.dataclass
class FullConfig(MethodConfig):
    """Every weight trains (``target_modules`` is ignored)."""

    name = "full"


@dataclasses.dataclass
class LinearProbeConfig(MethodConfig):
    """Only the output head trains: the classifier, or the LM head of a causal LM (untied
    from the input embeddings so that the inputs stay the pretrained ones)."""

    name = "linear_probe"


@register
class Full(Method):
    config_cls = FullConfig
    family = "baseline"
    # The trained weights *are* the model's weights: merging has nothing left to do
    # (no MergeableLayer is injected, so the default merge is a no-op).
    mergeable = True
    writes_base_weights = True

    def inject(self, model: nn.Module) -> None:
        model.requires_grad_(True)


@register
class LinearProbe(Method):
    config_cls = LinearProbeConfig
    family = "baseline"
    mergeable = True  # as for Full: the head's weights are the trained ones

    def inject(self, model: nn.Module) -> None:
        heads = targets.head_names(model)
        if not heads:
            raise TargetError(f"linear_probe: {type(model).__name__} has no output head to train")
        for name in heads:
            head = model.get_submodule(name)
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if emb is not None and getattr(head, "weight", None) is emb.weight:
                with partition.whole([emb.weight]):
                    head.weight = nn.Parameter(emb.weight.detach().clone())
                model.config.tie_word_embeddings = False
            head.requires_grad_(True)
