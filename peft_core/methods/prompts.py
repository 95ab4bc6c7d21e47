"""The soft-prompt family: ``prompt_tuning``, ``p_tuning``, ``prefix_tuning``, ``p_tuning_v2``.

Prompt tuning (Lester et al. 2021) learns N virtual token embeddings placed before the input.
P-tuning (Liu et al. 2021) produces them with a small MLP or LSTM encoder while training, and
folds the encoder's output into a plain table afterwards (:meth:`PTuning.finalize`). Prefix
tuning (Li & Liang 2021) learns keys and values that every attention layer sees first,
reparameterised by an MLP while training and folded likewise; P-tuning v2 (Liu et al. 2022)
learns those deep prompts directly, for classification and sequence labelling as well.

The trained module lives on the base model as ``peft_prompt``; how inputs change is in
``_prompt_inputs`` (input-level) and ``_prompt_prefix`` (prefix-level). None of them is
mergeable: the prompts are extra tokens, not a change of any weight.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import partition, targets
from ..config import MethodConfig, check
from ..errors import PeftError
from ..files import write_hf_folder
from ..method import Method
from ..registry import register
from . import _prompt_inputs, _prompt_prefix
from ._prompt_layout import Layout, layout
from ._prompt_modules import PrefixMLP, PromptEncoder, PromptTable, fold

#: attribute of the base model holding the method's module (so its parameters are
#: ``peft_prompt.*`` in adapter files, and DeepSpeed hooks it like any submodule)
MODULE = "peft_prompt"


# -- configs ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _SoftPromptConfig(MethodConfig):
    """``num_virtual_tokens`` N. ``target_modules`` does not apply (prompts attach to the
    inputs or the attention cache, not to modules)."""

    num_virtual_tokens: int = 20

    def validate(self) -> None:
        super().validate()
        n = self.num_virtual_tokens
        check(isinstance(n, int) and not isinstance(n, bool) and n > 0, self.name,
              "num_virtual_tokens", "an integer > 0", n)
        check(self.target_modules is None, self.name, "target_modules",
              "unset (soft prompts do not wrap modules)", self.target_modules)


@dataclasses.dataclass
class PromptTuningConfig(_SoftPromptConfig):
    """``init``: ``random`` (normal, at the scale of the model's token embeddings), ``vocab``
    (embeddings of N random vocabulary tokens) or ``text`` (the embedding of ``init_text``'s
    tokens, repeated to N; tokenised with ``tokenizer``, a name or path for transformers'
    AutoTokenizer, or given directly as ``init_token_ids``)."""

    name = "prompt_tuning"
    init: str = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    init_token_ids: list[int] | None = None

    def validate(self) -> None:
        super().validate()
        allowed = ("random", "vocab", "text")
        check(self.init in allowed, self.name, "init", f"one of {allowed}", self.init)
        ids = self.init_token_ids
        if ids is not None:
            check(isinstance(ids, list) and len(ids) > 0
                  and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids),
                  self.name, "init_token_ids", "a non-empty list of token ids", ids)
        if self.init == "text":
            check(ids is not None or (bool(self.init_text) and bool(self.tokenizer)), self.name,
                  "init", "init_token_ids, or init_text with tokenizer, for init 'text'", self.init)


@dataclasses.dataclass
class PTuningConfig(_SoftPromptConfig):
    """``encoder``: ``mlp`` (3 layers) or ``lstm`` (bidirectional, ``encoder_num_layers`` deep,
    then a 2-layer MLP head); ``encoder_hidden_size`` defaults to the model's width;
    ``encoder_dropout`` applies between LSTM layers. ``folded`` is set by ``finalize``: the
    encoder's output became a plain table (how the adapter is saved and served)."""

    name = "p_tuning"
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    folded: bool = False

    def validate(self) -> None:
        super().validate()
        check(self.encoder in ("mlp", "lstm"), self.name, "encoder", "'mlp' or 'lstm'", self.encoder)
        h = self.encoder_hidden_size
        check(h is None or (isinstance(h, int) and h > 0), self.name, "encoder_hidden_size",
              "an integer > 0 or null", h)
        check(isinstance(self.encoder_num_layers, int) and self.encoder_num_layers > 0, self.name,
              "encoder_num_layers", "an integer > 0", self.encoder_num_layers)
        check(0 <= self.encoder_dropout < 1, self.name, "encoder_dropout", "a number in [0, 1)",
              self.encoder_dropout)


@dataclasses.dataclass
class PrefixTuningConfig(_SoftPromptConfig):
    """``projection``: reparameterise the prefixes by an MLP (embedding of width kv_dim ->
    ``encoder_hidden_size`` -> tanh -> all layers' keys and values) while training, as the
    paper does; without it the prefixes are learned directly. ``dropout`` on the prefixes
    while training. ``folded`` is set by ``finalize`` once the MLP's output became plain
    prefixes."""

    name = "prefix_tuning"
    projection: bool = True
    encoder_hidden_size: int | None = None
    dropout: float = 0.0
    folded: bool = False

    def validate(self) -> None:
        super().validate()
        h = self.encoder_hidden_size
        check(h is None or (isinstance(h, int) and h > 0), self.name, "encoder_hidden_size",
              "an integer > 0 or null", h)
        check(0 <= self.dropout < 1, self.name, "dropout", "a number in [0, 1)", self.dropout)


@dataclasses.dataclass
class PTuningV2Config(_SoftPromptConfig):
    """Deep prompts learned directly at every layer. ``init``: ``random`` (standard normal,
    as the reference implementation) or ``vocab`` (the keys and values the model itself
    computes for N random vocabulary tokens, Li & Liang's real-word initialisation).
    ``dropout`` on the prompts while training."""

    name = "p_tuning_v2"
    init: str = "random"
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check(self.init in ("random", "vocab"), self.name, "init", "'random' or 'vocab'", self.init)
        check(0 <= self.dropout < 1, self.name, "dropout", "a number in [0, 1)", self.dropout)


# -- methods ------------------------------------------------------------------------------------
class _SoftPrompt(Method):
    family = "soft prompt"
    identity_at_init = False
    _layout: Layout

    def inject(self, model: nn.Module) -> None:
        if hasattr(model, MODULE):
            raise PeftError(f"{type(model).__name__} already has a {MODULE!r} module")
        self._layout = layout(model)
        p = next(model.get_input_embeddings().parameters())
        model.add_module(MODULE, self._build(model, self._layout, p.dtype, p.device))

    def _build(self, model: nn.Module, lay: Layout, dtype: torch.dtype, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def _fold(self, peft_model: nn.Module) -> None:
        """Replace the encoder by its output table (P-tuning, prefix tuning after training)."""
        model = peft_model.base_model
        setattr(model, MODULE, fold(getattr(model, MODULE)))
        self.config = self.config.replace(folded=True)
        peft_model.record_adapter_keys()

    def _export(self, peft_model: nn.Module, path: Path, peft_type: str, table: torch.Tensor,
                fields: dict[str, Any]) -> dict[str, Any]:
        model = peft_model.base_model
        task = _hf_task_type(model)
        heads = [h for h in targets.new_task_heads(model) if self.config.train_head]
        state = {"prompt_embeddings": table.detach().float().cpu().clone()}
        for head in heads:
            for pname, p in model.get_submodule(head).named_parameters():
                state[f"base_model.{head}.{pname}"] = p.detach().cpu().clone()
        cfg = model.config
        hf_cfg = {
            "peft_type": peft_type,
            "task_type": task,
            "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "inference_mode": True,
            "num_virtual_tokens": self.config.num_virtual_tokens,
            "num_transformer_submodules": 1,
            "num_layers": self._layout.num_layers,
            "modules_to_save": [h.rsplit(".", 1)[-1] for h in heads] or None,
            **fields,
        }
        write_hf_folder(path, hf_cfg, state)
        return hf_cfg


class _InputPrompt(_SoftPrompt):
    """Virtual tokens joined to the input embeddings."""

    def forward(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _prompt_inputs.forward(model, self._layout, getattr(model, MODULE), args, kwargs)

    def generate(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _prompt_inputs.generate(model, self._layout, getattr(model, MODULE), args, kwargs)

    def _export_input(self, peft_model: nn.Module, path: Path, peft_type: str,
                      fields: dict[str, Any]) -> dict[str, Any]:
        if self._layout.offset != 0:
            raise PeftError(
                f"{self.config.name}: this encoder's virtual tokens follow its [CLS] token so that "
                "pooling still reads [CLS]; Hugging Face peft puts them first, so an export "
                "would not compute the same thing (prefix_tuning / p_tuning_v2 export faithfully)"
            )
        model = peft_model.base_model
        with torch.no_grad():
            table = _eval_output(getattr(model, MODULE))
        fields = {"token_dim": self._layout.dim,
                  "num_attention_heads": model.config.num_attention_heads, **fields}
        return self._export(peft_model, path, peft_type, table, fields)


class _PrefixPrompt(_SoftPrompt):
    """Keys and values every attention layer sees before the real tokens."""

    def forward(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _prompt_prefix.forward(model, self._layout, getattr(model, MODULE),
                                      self.config.num_virtual_tokens, self.config.dropout,
                                      args, kwargs)

    def generate(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _prompt_prefix.generate(model, self._layout, getattr(model, MODULE),
                                       self.config.num_virtual_tokens, args, kwargs)

    def _export_prefix(self, peft_model: nn.Module, path: Path, projection: bool,
                       hidden: int) -> dict[str, Any]:
        lay = self._layout
        with torch.no_grad():
            table = _eval_output(getattr(peft_model.base_model, MODULE))
        fields = {
            # peft's names for the cached key/value shape (it narrows both for grouped-query
            # attention the same way)
            "token_dim": lay.kv_heads * lay.head_dim,
            "num_attention_heads": lay.kv_heads,
            "encoder_hidden_size": hidden,
            "prefix_projection": projection,
        }
        return self._export(peft_model, path, "PREFIX_TUNING", table, fields)


@register
class PromptTuning(_InputPrompt):
    config_cls = PromptTuningConfig

    def _build(self, model, lay, dtype, device):
        table = PromptTable(self.config.num_virtual_tokens, lay.dim, dtype=dtype, device=device)
        with torch.no_grad():
            table.embedding.weight.copy_(self._initial(model, lay))
        return table

    def _initial(self, model: nn.Module, lay: Layout) -> torch.Tensor:
        cfg, n = self.config, self.config.num_virtual_tokens
        emb = model.get_input_embeddings()
        vocab = emb.num_embeddings
        device = next(emb.parameters()).device
        if cfg.init == "text":
            ids = list(cfg.init_token_ids) if cfg.init_token_ids is not None else _tokenize(cfg)
            bad = [i for i in ids if i >= vocab]
            if bad:
                raise PeftError(f"{cfg.name}.init_token_ids: ids {bad[:5]} are outside the "
                                f"vocabulary of {vocab} tokens")
            ids = (ids * math.ceil(n / len(ids)))[:n]
            tokens = torch.tensor(ids, device=device)
        else:
            tokens = torch.randint(0, vocab, (n if cfg.init == "vocab" else min(vocab, 1024),),
                                   device=device)
        # A module call, not a read of .weight: ZeRO-3 gathers the matrix for this call only.
        with partition.gathered_forward(emb):
            vectors = emb(tokens).float()
        if cfg.init == "random":
            return torch.randn(n, lay.dim, device=device) * vectors.std()
        return vectors

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        return self._export_input(peft_model, path, "PROMPT_TUNING", {
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        })


@register
class PTuning(_InputPrompt):
    config_cls = PTuningConfig

    def _build(self, model, lay, dtype, device):
        cfg, n = self.config, self.config.num_virtual_tokens
        if cfg.folded:
            return PromptTable(n, lay.dim, dtype=dtype, device=device)
        return PromptEncoder(n, lay.dim, cfg.encoder_hidden_size or lay.dim, cfg.encoder,
                             cfg.encoder_num_layers, cfg.encoder_dropout, dtype=dtype, device=device)

    def finalize(self, peft_model: nn.Module, batches: Any) -> None:
        if not self.config.folded:
            self._fold(peft_model)

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        # peft stores P-tuning as its encoder's output ("prompt_embeddings"), which it reads
        # back as a plain table in inference mode: the folded form, whether folded yet or not.
        cfg = self.config
        return self._export_input(peft_model, path, "P_TUNING", {
            "encoder_reparameterization_type": cfg.encoder.upper(),
            "encoder_hidden_size": cfg.encoder_hidden_size or self._layout.dim,
            "encoder_num_layers": cfg.encoder_num_layers,
            "encoder_dropout": cfg.encoder_dropout,
        })


@register
class PrefixTuning(_PrefixPrompt):
    config_cls = PrefixTuningConfig

    def _hidden(self, lay: Layout) -> int:
        return self.config.encoder_hidden_size or lay.kv_heads * lay.head_dim

    def _build(self, model, lay, dtype, device):
        cfg, n = self.config, self.config.num_virtual_tokens
        if cfg.folded or not cfg.projection:
            return PromptTable(n, lay.prefix_width, dtype=dtype, device=device)
        return PrefixMLP(n, lay.kv_heads * lay.head_dim, self._hidden(lay), lay.prefix_width,
                         dtype=dtype, device=device)

    def finalize(self, peft_model: nn.Module, batches: Any) -> None:
        if self.config.projection and not self.config.folded:
            self._fold(peft_model)

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        # peft saves the MLP's output, which it loads as plain prefixes in inference mode.
        return self._export_prefix(peft_model, path, self.config.projection, self._hidden(self._layout))


@register
class PTuningV2(_PrefixPrompt):
    config_cls = PTuningV2Config

    def _build(self, model, lay, dtype, device):
        table = PromptTable(self.config.num_virtual_tokens, lay.prefix_width, dtype=dtype, device=device)
        if self.config.init == "vocab":
            with torch.no_grad():
                emb = model.get_input_embeddings()
                ids = torch.randint(0, emb.num_embeddings, (1, self.config.num_virtual_tokens),
                                    device=device)
                table.embedding.weight.copy_(_token_activations(model, lay, ids))
        return table

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        lay = self._layout
        return self._export_prefix(peft_model, path, False, lay.kv_heads * lay.head_dim)


# -- helpers ------------------------------------------------------------------------------------
def _eval_output(module: nn.Module) -> torch.Tensor:
    was = module.training
    module.eval()
    try:
        return module()
    finally:
        module.train(was)


def _tokenize(cfg: PromptTuningConfig) -> list[int]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as e:  # any loading failure means the same to the user
        raise PeftError(f"{cfg.name}.tokenizer: cannot load {cfg.tokenizer!r}: {e}") from e
    ids = tok(cfg.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PeftError(f"{cfg.name}.init_text: {cfg.init_text!r} tokenises to nothing")
    return list(ids)


def _token_activations(model: nn.Module, lay: Layout, ids: torch.Tensor) -> torch.Tensor:
    """Every layer's keys and values for the ``(1, n)`` tokens ``ids``, flattened like a prefix."""
    from transformers import DynamicCache

    n = ids.shape[1]
    cache = DynamicCache(config=model.config)
    was = model.training
    model.eval()
    try:
        with partition.gathered_forward(model):
            model(input_ids=ids, **{lay.cache_kwarg: cache})
    finally:
        model.train(was)
    layers = [t for layer in cache.layers[: lay.num_layers] for t in (layer.keys[0], layer.values[0])]
    if len(layers) != 2 * lay.num_layers:
        raise PeftError("p_tuning_v2.init: the model did not fill a KV cache; use init 'random'")
    # (2L, heads, N, head_dim) -> (N, 2L * heads * head_dim), the layout build_cache reads
    return torch.stack(layers).permute(2, 0, 1, 3).reshape(n, -1)


def _hf_task_type(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS")):
        if name.endswith(suffix):
            return task
    raise PeftError(f"{name}: Hugging Face peft has no prompt-learning task type for this model "
                    "(causal LM, sequence or token classification)")
