"""What every export to Hugging Face peft's folder shares: the new task heads, which peft
keeps whole as ``modules_to_save``."""

from __future__ import annotations

import torch
from torch import nn

from .. import targets


def head_state(
    model: nn.Module, train_head: bool, prefix: str = "base_model.model."
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(the trained new task heads, their tensors under peft's names ``prefix + name``).

    peft names a LoRA-style adapter's tensors ``base_model.model.<module>`` and a prompt
    method's ``base_model.<module>``."""
    heads = [h for h in targets.new_task_heads(model) if train_head]
    state = {f"{prefix}{head}.{pname}": p.detach().cpu().clone()
             for head in heads for pname, p in model.get_submodule(head).named_parameters()}
    return heads, state


def modules_to_save(heads: list[str]) -> list[str] | None:
    """peft's ``modules_to_save``: the heads' leaf names, or None without heads."""
    return [h.rsplit(".", 1)[-1] for h in heads] or None
