"""Export to Hugging Face peft's prompt-learning folders (PROMPT_TUNING, P_TUNING,
PREFIX_TUNING): peft stores every prompt as its table, which it reads back as such in
inference mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import PeftError
from ...files import write_hf_folder
from .._peft_export import head_state, modules_to_save
from .configs import SoftPromptConfig
from .layout import Layout
from .modules import MODULE, eval_output


def write_table(peft_model: nn.Module, path: Path, config: SoftPromptConfig, lay: Layout,
                peft_type: str, table: torch.Tensor, fields: dict[str, Any]) -> dict[str, Any]:
    """Write peft's folder for the prompt ``table``; returns its adapter_config."""
    model = peft_model.base_model
    task = hf_task_type(model)
    heads, head_tensors = head_state(model, config.train_head, prefix="base_model.")
    state = {"prompt_embeddings": table.detach().float().cpu().clone(), **head_tensors}
    cfg = model.config
    hf_cfg = {
        "peft_type": peft_type,
        "task_type": task,
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "inference_mode": True,
        "num_virtual_tokens": config.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "num_layers": lay.num_layers,
        "modules_to_save": modules_to_save(heads),
        **fields,
    }
    write_hf_folder(path, hf_cfg, state)
    return hf_cfg


def export_input(peft_model: nn.Module, path: Path, config: SoftPromptConfig, lay: Layout,
                 peft_type: str, fields: dict[str, Any]) -> dict[str, Any]:
    """An input-level prompt (prompt tuning, P-tuning): its virtual token embeddings."""
    if lay.offset != 0:
        raise PeftError(
            f"{config.name}: this encoder's virtual tokens follow its [CLS] token so that "
            "pooling still reads [CLS]; Hugging Face peft puts them first, so an export "
            "would not compute the same thing (prefix_tuning / p_tuning_v2 export faithfully)"
        )
    model = peft_model.base_model
    with torch.no_grad():
        table = eval_output(getattr(model, MODULE))
    fields = {"token_dim": lay.dim, "num_attention_heads": model.config.num_attention_heads,
              **fields}
    return write_table(peft_model, path, config, lay, peft_type, table, fields)


def export_prefix(peft_model: nn.Module, path: Path, config: SoftPromptConfig, lay: Layout,
                  projection: bool, hidden: int) -> dict[str, Any]:
    """A prefix-level prompt (prefix tuning, P-tuning v2): every layer's keys and values."""
    with torch.no_grad():
        table = eval_output(getattr(peft_model.base_model, MODULE))
    fields = {
        # peft's names for the cached key/value shape (it narrows both for grouped-query
        # attention the same way)
        "token_dim": lay.kv_heads * lay.head_dim,
        "num_attention_heads": lay.kv_heads,
        "encoder_hidden_size": hidden,
        "prefix_projection": projection,
    }
    return write_table(peft_model, path, config, lay, "PREFIX_TUNING", table, fields)


def hf_task_type(model: nn.Module) -> str:
    """peft's ``task_type`` for a transformers model class."""
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS")):
        if name.endswith(suffix):
            return task
    raise PeftError(f"{name}: Hugging Face peft has no prompt-learning task type for this model "
                    "(causal LM, sequence or token classification)")
