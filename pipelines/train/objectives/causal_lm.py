"""Causal language modelling: next-token cross-entropy over the positions whose label is
not -100 (the dataset's label mask: prompts, padding and a prompt method's virtual tokens
are not trained on), token accuracy and perplexity."""

from __future__ import annotations

import math

import torch

from .. import metrics as M
from .base import EvalSums, Objective, register


class TokenSums(EvalSums):
    """Loss, token accuracy over trained positions and perplexity."""

    def __init__(self) -> None:
        super().__init__()
        self.correct = self.count = 0.0

    def add(self, loss: float, weight: int, logits: torch.Tensor,
            batch: dict[str, torch.Tensor]) -> None:
        super().add(loss, weight, logits, batch)
        labels = batch["labels"].to(logits.device)
        # Logits are tail-aligned with the labels (prompt methods prepend virtual tokens to
        # the logits, not to the labels).
        n = labels.shape[1]
        pred = logits[:, -n:][:, :-1].argmax(-1)
        tgt = labels[:, 1:]
        mask = tgt != -100
        self.correct += float((pred[mask] == tgt[mask]).sum())
        self.count += float(mask.sum())

    def result(self) -> dict[str, float]:
        out = super().result()
        correct, count = M.all_reduce([self.correct, self.count])
        out[M.PERPLEXITY] = math.exp(min(out[M.EVAL_LOSS], 50.0))
        out["eval_token_accuracy"] = correct / count if count else math.nan
        return out


@register
class CausalLM(Objective):
    name = "causal_lm"
    # instruction data is causal LM data whose prompt positions are labelled -100
    default_for = ("causal_lm", "instruction")

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        # the loss averages over the shifted positions that have a label
        return int((batch["labels"][:, 1:] != -100).sum())

    def eval_sums(self, *, calibrate: bool = False) -> EvalSums:
        return TokenSums()
