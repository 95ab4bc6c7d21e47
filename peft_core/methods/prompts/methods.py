"""The four registered soft-prompt methods and what they share: the module on the base
model, how calls reach it, folding an encoder into its table after training."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import PeftError
from ...method import Method
from ...registry import register
from . import inputs, prefix
from .configs import PrefixTuningConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config
from .export import export_input, export_prefix
from .initial import prompt_tuning_table, token_activations, vocab_embeddings
from .layout import Layout, layout
from .modules import MODULE, PrefixMLP, PromptEncoder, PromptTable, fold


class SoftPrompt(Method):
    """A method whose trained module sits on the base model as ``peft_prompt``."""

    family = "soft prompt"
    identity_at_init = False
    _layout: Layout
    #: whether ``finalize`` replaced the encoder by its output table (run-time state, saved
    #: as the adapter's ``method_state``)
    folded: bool = False

    def inject(self, model: nn.Module) -> None:
        if hasattr(model, MODULE):
            raise PeftError(f"{type(model).__name__} already has a {MODULE!r} module")
        self._layout = layout(model)
        p = next(model.get_input_embeddings().parameters())
        model.add_module(MODULE, self._build(model, self._layout, p.dtype, p.device))

    def _build(self, model: nn.Module, lay: Layout, dtype: torch.dtype,
               device: torch.device) -> nn.Module:
        raise NotImplementedError

    def _fold(self, peft_model: nn.Module) -> None:
        """Replace the encoder by its output table (P-tuning, prefix tuning after training)."""
        model = peft_model.base_model
        setattr(model, MODULE, fold(getattr(model, MODULE)))
        self.folded = True
        peft_model.record_adapter_keys()

    def run_state(self) -> dict[str, Any]:
        return {"folded": True} if self.folded else {}

    def restore_run_state(self, peft_model: nn.Module, run_state: Mapping[str, Any]) -> None:
        unknown = sorted(set(run_state) - {"folded"})
        if unknown:
            raise PeftError(f"{self.config.name}: unknown run-time state {unknown} in the "
                            "adapter; it knows 'folded'")
        if run_state.get("folded") and not self.folded:
            self._fold(peft_model)  # the table's values are the adapter's, loaded next


class InputPrompt(SoftPrompt):
    """Virtual tokens joined to the input embeddings."""

    def forward(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return inputs.forward(model, self._layout, getattr(model, MODULE), args, kwargs)

    def generate(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return inputs.generate(model, self._layout, getattr(model, MODULE), args, kwargs)


class PrefixPrompt(SoftPrompt):
    """Keys and values every attention layer sees before the real tokens."""

    def forward(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return prefix.forward(model, self._layout, getattr(model, MODULE),
                              self.config.num_virtual_tokens, self.config.dropout, args, kwargs)

    def generate(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return prefix.generate(model, self._layout, getattr(model, MODULE),
                               self.config.num_virtual_tokens, args, kwargs)


@register
class PromptTuning(InputPrompt):
    config_cls = PromptTuningConfig

    def _build(self, model, lay, dtype, device):
        table = PromptTable(self.config.num_virtual_tokens, lay.dim, dtype=dtype, device=device)
        with torch.no_grad():
            table.embedding.weight.copy_(prompt_tuning_table(model, lay, self.config))
        return table

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        return export_input(peft_model, path, self.config, self._layout, "PROMPT_TUNING", {
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        })


@register
class PTuning(InputPrompt):
    config_cls = PTuningConfig

    def _build(self, model, lay, dtype, device):
        cfg = self.config
        enc = PromptEncoder(cfg.num_virtual_tokens, lay.dim, cfg.encoder_hidden_size or lay.dim,
                            cfg.encoder, cfg.encoder_num_layers, cfg.encoder_dropout,
                            dtype=dtype, device=device)
        if cfg.init == "vocab":
            with torch.no_grad():
                enc.embedding.weight.copy_(vocab_embeddings(model, cfg.num_virtual_tokens))
        return enc

    def finalize(self, peft_model: nn.Module, batches: Any) -> None:
        if not self.folded:
            self._fold(peft_model)

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        # peft stores P-tuning as its encoder's output ("prompt_embeddings"), which it reads
        # back as a plain table in inference mode: the folded form, whether folded yet or not.
        cfg = self.config
        return export_input(peft_model, path, cfg, self._layout, "P_TUNING", {
            "encoder_reparameterization_type": cfg.encoder.upper(),
            "encoder_hidden_size": cfg.encoder_hidden_size or self._layout.dim,
            "encoder_num_layers": cfg.encoder_num_layers,
            "encoder_dropout": cfg.encoder_dropout,
        })


@register
class PrefixTuning(PrefixPrompt):
    config_cls = PrefixTuningConfig

    def _hidden(self, lay: Layout) -> int:
        return self.config.encoder_hidden_size or lay.kv_heads * lay.head_dim

    def _build(self, model, lay, dtype, device):
        n = self.config.num_virtual_tokens
        if not self.config.projection:
            return PromptTable(n, lay.prefix_width, dtype=dtype, device=device)
        return PrefixMLP(n, lay.kv_heads * lay.head_dim, self._hidden(lay), lay.prefix_width,
                         dtype=dtype, device=device)

    def finalize(self, peft_model: nn.Module, batches: Any) -> None:
        if self.config.projection and not self.folded:
            self._fold(peft_model)

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        # peft saves the MLP's output, which it loads as plain prefixes in inference mode.
        return export_prefix(peft_model, path, self.config, self._layout,
                             self.config.projection, self._hidden(self._layout))


@register
class PTuningV2(PrefixPrompt):
    config_cls = PTuningV2Config

    def _build(self, model, lay, dtype, device):
        n = self.config.num_virtual_tokens
        table = PromptTable(n, lay.prefix_width, dtype=dtype, device=device)
        if self.config.init == "vocab":
            with torch.no_grad():
                emb = model.get_input_embeddings()
                ids = torch.randint(0, emb.num_embeddings, (1, n), device=device)
                table.embedding.weight.copy_(token_activations(model, lay, ids))
        return table

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        lay = self._layout
        return export_prefix(peft_model, path, self.config, lay, False,
                             lay.kv_heads * lay.head_dim)
