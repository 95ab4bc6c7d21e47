"""The configs of the soft-prompt methods."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, check


@dataclasses.dataclass
class SoftPromptConfig(MethodConfig):
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
class PromptTuningConfig(SoftPromptConfig):
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
class PTuningConfig(SoftPromptConfig):
    """``encoder``: ``mlp`` (3 layers) or ``lstm`` (bidirectional, ``encoder_num_layers`` deep,
    then a 2-layer MLP head); ``encoder_hidden_size`` defaults to the model's width;
    ``encoder_dropout`` applies between LSTM layers. ``init``: the encoder's inputs start as
    the embeddings of N random vocabulary tokens (``vocab``, the default) or standard normal
    (``random``, as peft and the paper's code start them). From ``random`` inputs, 20x the
    embeddings' scale on MiniLM, the MLP's output started at 1.9x the word embeddings' std
    and Adam grew it to 20x within 120 steps at 3e-3 (one seed of three of the methods
    benchmark at chance); from ``vocab`` inputs it started at 1.0x and ended at 2.7-3.8x.
    ``finalize`` folds the encoder's output into a plain table (how the adapter is saved
    and served): run-time state of the method, not a field."""

    name = "p_tuning"
    former_fields = ("folded",)  # adapters saved before the run-time state had its section
    init: str = "vocab"
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check(self.init in ("vocab", "random"), self.name, "init", "'vocab' or 'random'",
              self.init)
        check(self.encoder in ("mlp", "lstm"), self.name, "encoder", "'mlp' or 'lstm'",
              self.encoder)
        h = self.encoder_hidden_size
        check(h is None or (isinstance(h, int) and h > 0), self.name, "encoder_hidden_size",
              "an integer > 0 or null", h)
        check(isinstance(self.encoder_num_layers, int) and self.encoder_num_layers > 0, self.name,
              "encoder_num_layers", "an integer > 0", self.encoder_num_layers)
        check(0 <= self.encoder_dropout < 1, self.name, "encoder_dropout", "a number in [0, 1)",
              self.encoder_dropout)


@dataclasses.dataclass
class PrefixTuningConfig(SoftPromptConfig):
    """``projection``: reparameterise the prefixes by an MLP (embedding of width kv_dim ->
    ``encoder_hidden_size`` -> tanh -> all layers' keys and values) while training, as the
    paper does; without it the prefixes are learned directly. ``dropout`` on the prefixes
    while training. ``finalize`` folds the MLP's output into plain prefixes (run-time state
    of the method, not a field)."""

    name = "prefix_tuning"
    former_fields = ("folded",)  # adapters saved before the run-time state had its section
    projection: bool = True
    encoder_hidden_size: int | None = None
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        h = self.encoder_hidden_size
        check(h is None or (isinstance(h, int) and h > 0), self.name, "encoder_hidden_size",
              "an integer > 0 or null", h)
        check(0 <= self.dropout < 1, self.name, "dropout", "a number in [0, 1)", self.dropout)


@dataclasses.dataclass
class PTuningV2Config(SoftPromptConfig):
    """Deep prompts learned directly at every layer. ``init``: ``random`` (standard normal,
    as the reference implementation) or ``vocab`` (the keys and values the model itself
    computes for N random vocabulary tokens, Li & Liang's real-word initialisation).
    ``dropout`` on the prompts while training."""

    name = "p_tuning_v2"
    init: str = "random"
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check(self.init in ("random", "vocab"), self.name, "init", "'random' or 'vocab'",
              self.init)
        check(0 <= self.dropout < 1, self.name, "dropout", "a number in [0, 1)", self.dropout)
