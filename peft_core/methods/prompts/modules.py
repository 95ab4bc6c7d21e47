"""The trainable modules of the soft-prompt family (no knowledge of the base model here).

Every module returns its virtual tokens from ``forward()`` through an embedding lookup over
its own weights: DeepSpeed ZeRO-3 materialises a module's partitioned parameters only inside
that module's forward, so reading ``.weight`` directly from outside would see an empty tensor.
"""

from __future__ import annotations

import torch
from torch import nn

#: attribute of the base model holding the method's module (so its parameters are
#: ``peft_prompt.*`` in adapter files, and DeepSpeed hooks it like any submodule)
MODULE = "peft_prompt"


class PromptTable(nn.Module):
    """``num_tokens`` free vectors of width ``dim``: prompt-tuning prompts, deep prefixes, and
    the folded (inference) form of the P-tuning and prefix-tuning encoders."""

    def __init__(
        self, num_tokens: int, dim: int, *, dtype: torch.dtype, device: torch.device | None
    ):
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, dim, dtype=dtype, device=device)
        self.register_buffer("indices", torch.arange(num_tokens, device=device), persistent=False)

    def forward(self) -> torch.Tensor:
        """The ``(num_tokens, dim)`` table."""
        return self.embedding(self.indices)


class PromptEncoder(nn.Module):
    """P-tuning's reparameterisation (Liu et al. 2021): trainable inputs passed through an MLP,
    or through a bidirectional LSTM and an MLP head, so the virtual tokens depend on each
    other."""

    def __init__(
        self, num_tokens: int, dim: int, hidden: int, kind: str, num_layers: int, dropout: float,
        *, dtype: torch.dtype, device: torch.device | None,
    ):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.kind = kind
        self.embedding = nn.Embedding(num_tokens, dim, **kw)
        self.register_buffer("indices", torch.arange(num_tokens, device=device), persistent=False)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(
                dim, hidden, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                bidirectional=True, batch_first=True, **kw,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                nn.Linear(2 * hidden, dim, **kw),
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden, **kw), nn.ReLU(),
                nn.Linear(hidden, hidden, **kw), nn.ReLU(),
                nn.Linear(hidden, dim, **kw),
            )

    def forward(self) -> torch.Tensor:
        """The ``(num_tokens, dim)`` virtual-token embeddings."""
        x = self.embedding(self.indices).unsqueeze(0)
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


class PrefixMLP(nn.Module):
    """Prefix-tuning's reparameterisation (Li & Liang 2021): a small embedding per virtual token
    mapped by a tanh MLP to that token's keys and values at every layer (``out`` wide)."""

    def __init__(
        self, num_tokens: int, dim: int, hidden: int, out: int,
        *, dtype: torch.dtype, device: torch.device | None,
    ):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.embedding = nn.Embedding(num_tokens, dim, **kw)
        self.register_buffer("indices", torch.arange(num_tokens, device=device), persistent=False)
        self.transform = nn.Sequential(
            nn.Linear(dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, out, **kw)
        )

    def forward(self) -> torch.Tensor:
        """The ``(num_tokens, out)`` flattened prefixes."""
        return self.transform(self.embedding(self.indices))


def eval_output(module: nn.Module) -> torch.Tensor:
    """``module()`` evaluated without dropout (its training mode restored after)."""
    was = module.training
    module.eval()
    try:
        return module()
    finally:
        module.train(was)


def fold(module: nn.Module) -> PromptTable:
    """A :class:`PromptTable` holding ``module()``'s current output (evaluated without dropout),
    so inference and export need no encoder."""
    with torch.no_grad():
        table = eval_output(module).detach()
    folded = PromptTable(table.shape[0], table.shape[1], dtype=table.dtype, device=table.device)
    with torch.no_grad():
        folded.embedding.weight.copy_(table)
    return folded
