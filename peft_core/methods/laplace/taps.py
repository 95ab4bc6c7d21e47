"""What fitting and prediction read off the network: the inputs and output gradients of
every LoRA ``Linear`` (forward hooks), per example, and which positions are predictions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import PeftError


class Tap:
    """Forward hooks keeping each module's input (detached) and output (in the graph)."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []

    def __enter__(self) -> Tap:
        for i, m in enumerate(self.modules):
            def hook(_mod, args, out, i=i):
                self.inputs[i] = args[0].detach()
                self.outputs[i] = out
            self._handles.append(m.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def output_grads(self, scalar: torch.Tensor) -> list[torch.Tensor]:
        if any(o is None or not o.requires_grad for o in self.outputs):
            raise PeftError("laplace_lora: a LoRA layer did not run or its weights do not "
                            "require grad")
        grads = torch.autograd.grad(scalar, self.outputs, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(o) if g is None else g for o, g in zip(self.outputs, grads)]


def per_example(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d)."""
    return t.reshape(batch_size, -1, t.shape[-1])


def token_mask(batch: Mapping[str, torch.Tensor], b: int, t: int, device) -> torch.Tensor:
    am = batch.get("attention_mask")
    if isinstance(am, torch.Tensor) and tuple(am.shape) == (b, t):
        return am.to(device=device, dtype=torch.float32)
    return torch.ones(b, t, device=device)


def prediction_logits(
    logits: torch.Tensor, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, unit mask): ``(B, C)`` with every row a unit, or a causal LM's ``(B, T, V)``
    where position t predicts label t+1 and counts if that label exists."""
    if logits.ndim == 2:
        return logits, torch.ones(logits.shape[0], device=logits.device)
    if logits.ndim != 3:
        raise PeftError(f"laplace_lora: expected logits of shape (B, C) or (B, T, V), got "
                        f"{tuple(logits.shape)}")
    b, t, _ = logits.shape
    mask = torch.zeros(b, t, device=logits.device)
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and tuple(labels.shape) == (b, t):
        mask[:, :-1] = (labels[:, 1:] != -100).float().to(logits.device)
    else:
        mask[:, :-1] = token_mask(batch, b, t, logits.device)[:, 1:]
    return logits, mask


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    # The curvature and the predictive need no loss; drop labels so no head computes one.
    return {k: v for k, v in batch.items() if k != "labels"}
