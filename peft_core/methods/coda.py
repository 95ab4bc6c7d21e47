"""``coda``: Conditional Adapters (Lei et al. 2023, arXiv 2304.04947), feed-forward part.

Every token goes through a light parallel adapter; the frozen, heavy FFN sublayer runs only
for the k tokens a learned router picks (``k = ceil(route_fraction · n)`` of the n real tokens
of each sequence)::

    FFN'(x_i) = s · A(x_i) + λ_i · FFN(x_i)

- Router: a score ``w · x_i`` per token, standardised over the real tokens of its sequence
  (so ``epsilon`` is in units of the score's spread, whatever the model's activation scale).
- Training (``module.training``): ``λ = soft_topk(scores, k, epsilon)``, the solution of the
  entropy-regularised top-k problem the paper uses, ``max_λ s·λ + ε H(λ)`` subject to
  ``Σλ = k``, ``0 ≤ λ ≤ 1``: ``λ_i = min(1, exp((s_i - τ)/ε))`` with τ set by ``Σλ = k``.
  It is differentiable in the scores, which is how the router learns. This relaxation
  weighs the FFN output of every token, so the FFN runs on all of them while training.
- Inference (``module.eval()``): hard top-k, ``λ_i ∈ {0, 1}``. The k chosen tokens are
  gathered, the FFN runs on them only, and the results are scattered back: the other tokens
  really skip the heavy computation. As ε → 0 the soft weights tend to these hard ones.

Padding: the attention mask given to the model's forward (or ``generate``) is recorded by a
forward pre-hook on the model and read by every CoDA layer; padding tokens are never routed
and do not count in n. Only a 2-D (batch, length) padding mask is understood; without one,
every position counts as a real token.

Limitations (documented, not hidden): only the FFN is conditional (the paper also lets only
the routed tokens query in attention); on causal LMs the choice of the top-k tokens of a
sequence looks at the scores of later tokens too, and with a KV cache each decoding step routes
only its new token(s) (a single new token is always routed), so cached generation is not
the same computation as one forward pass over the whole text.

Sizes and placement are those of :mod:`.adapters` (same config fields, same table); on BERT,
whose FFN is split over ``intermediate`` and ``output.dense``, the two are moved under one
:class:`CodaFFN` and ``output.dense`` becomes an identity.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
from torch import nn

from .. import targets
from ..config import check
from ..errors import PeftError, TargetError
from ..registry import register
from .adapters import Bottleneck, BottleneckConfig, BottleneckMethod, like_param

# Finite stand-in for -inf for padding scores: -inf would turn gradients into NaN in the
# logcumsumexp backward; standardised scores are never near this.
_PAD_SCORE = -1.0e4


@dataclasses.dataclass
class CodaConfig(BottleneckConfig):
    """A parallel adapter (``bottleneck``/``reduction_factor``, ``activation``, ``scaling``)
    beside each FFN, which runs only for the top ``route_fraction`` of the tokens;
    ``epsilon`` is the soft top-k's temperature during training."""

    name = "coda"
    scaling: float = 4.0
    route_fraction: float = 0.25
    epsilon: float = 0.1

    def validate(self) -> None:
        super().validate()
        check(self.scaling > 0, self.name, "scaling", "a number > 0", self.scaling)
        check(0 < self.route_fraction <= 1, self.name, "route_fraction", "a number in (0, 1]",
              self.route_fraction)
        check(self.epsilon >= 1e-3, self.name, "epsilon", "a number >= 0.001", self.epsilon)


# -- routing -----------------------------------------------------------------------------------
def route_counts(valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """k per sequence: ``ceil(fraction · n)`` of its n real tokens, at least 1 if n > 0."""
    n = valid.sum(dim=-1)
    # The small offset keeps float noise (0.3 · 10 = 3.0000000000000004) from adding a token.
    k = torch.ceil(n.double() * fraction - 1e-9).long()
    return torch.minimum(k.clamp(min=1), n)


def standardise(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scores centred and scaled over the real tokens of each sequence (monotone per row)."""
    w = valid.to(scores.dtype)
    n = w.sum(dim=-1, keepdim=True).clamp(min=1)
    mean = (scores * w).sum(dim=-1, keepdim=True) / n
    var = ((scores - mean) ** 2 * w).sum(dim=-1, keepdim=True) / n
    return (scores - mean) * torch.rsqrt(var + 1e-6)


def soft_topk(
    scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """The entropy-regularised top-k weights ``λ`` (batch, length), each row summing to its k.

    ``λ_i = min(1, exp((s_i - τ)/ε))``. With the scores sorted (s_(0) ≥ s_(1) ≥ ...) and the
    first m of them saturated at 1, ``τ_m = ε (logsumexp_{i≥m} s_(i)/ε - log(k - m))``; the
    solution uses the smallest m < k with ``s_(m) ≤ τ_m`` (it exists whenever k ≤ n). Solved
    in closed form, so autograd gives the exact gradient of the piecewise-smooth solution.
    """
    s = scores.masked_fill(~valid, _PAD_SCORE)
    length = s.shape[-1]
    sorted_s, _ = s.sort(dim=-1, descending=True)
    suffix_lse = torch.logcumsumexp((sorted_s / epsilon).flip(-1), dim=-1).flip(-1)
    m = torch.arange(length, device=s.device)
    remaining = (k.unsqueeze(-1) - m).clamp(min=1).to(s.dtype)
    tau = epsilon * (suffix_lse - remaining.log())
    feasible = (m < k.unsqueeze(-1)) & (sorted_s <= tau)
    first = feasible.int().argmax(dim=-1, keepdim=True)
    tau_star = tau.gather(-1, first)
    # exp(min(a, 0)) == min(1, exp(a)), without an overflowing exp whose clamp has NaN grads.
    lam = torch.exp(((s - tau_star) / epsilon).clamp(max=0.0))
    return lam * (valid & (k > 0).unsqueeze(-1)).to(lam.dtype)


def hard_topk(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A boolean (batch, length) mask of the k highest-scoring real tokens of each row."""
    s = scores.masked_fill(~valid, float("-inf"))
    order = s.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return (ranks < k.unsqueeze(-1)) & valid


class RoutingContext:
    """The padding mask of the model's current call, shared by its CoDA layers."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        """Which of the (batch, length) positions of ``x`` are real tokens."""
        batch, length = x.shape[0], x.shape[1]
        mask = self.mask
        if mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=x.device)
        if mask.shape[0] != batch or mask.shape[1] < length:
            raise PeftError(
                f"coda: the recorded attention_mask has shape {tuple(mask.shape)}, which does not "
                f"cover hidden states of (batch, length) = ({batch}, {length}); call the whole "
                "model, or set RoutingContext.mask for a direct call"
            )
        # With a KV cache the mask spans past + current tokens; the current ones come last.
        return mask[:, mask.shape[1] - length :].to(device=x.device, dtype=torch.bool)


class MaskRecorder:
    """Forward pre-hook on the top-level model: records its ``attention_mask`` argument.

    The mask stays recorded after the call so that activation-checkpointing recomputation
    (during backward) routes exactly as the forward did.
    """

    def __init__(self, context: RoutingContext, forward: Any):
        self.context = context
        params = list(inspect.signature(forward).parameters)
        self.position = params.index("attention_mask") if "attention_mask" in params else None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        ok = isinstance(mask, torch.Tensor) and mask.dim() == 2
        self.context.mask = mask.detach() if ok else None


class CodaFFN(nn.Module):
    """``s · A(x) + λ ⊙ heavy(x)``, with ``heavy`` the frozen FFN run on routed tokens only
    at inference."""

    def __init__(
        self,
        heavy: nn.Module,
        hidden: int,
        config: CodaConfig,
        routing: RoutingContext,
        like: torch.Tensor | None,
    ):
        super().__init__()
        self.heavy = heavy
        self.adapter = Bottleneck(hidden, config.size(hidden), config.activation, like)
        kw: dict[str, Any] = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.router = nn.Linear(hidden, 1, bias=False, **kw)  # a bias would not change any top-k
        # Random, not zero: zero scores tie every token, and standardising them has no gradient.
        nn.init.normal_(self.router.weight, std=1.0 / math.sqrt(hidden))
        self.scaling = config.scaling
        self.route_fraction = config.route_fraction
        self.epsilon = config.epsilon
        self.routing = routing

    def routing_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(standardised scores, k per row, valid mask) for hidden states ``x``."""
        valid = self.routing.valid(x)
        scores = standardise(self.router(x).squeeze(-1).float(), valid)
        return scores, route_counts(valid, self.route_fraction), valid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        light = self.scaling * self.adapter(x)
        scores, k, valid = self.routing_weights(x)
        if self.training:
            lam = soft_topk(scores, k, valid, self.epsilon).to(x.dtype)
            return light + lam.unsqueeze(-1) * self.heavy(x)
        rows, cols = hard_topk(scores, k, valid).nonzero(as_tuple=True)
        # Gather the routed tokens into one (1, N, d) sequence, run the FFN on them only,
        # and scatter the results back; the other tokens never touch the FFN's weights.
        # Called even with N = 0 (an all-padding batch): under ZeRO-3 every rank must take
        # part in gathering the FFN's weights, or the others wait forever.
        heavy = self.heavy(x[rows, cols].unsqueeze(0)).squeeze(0)
        return light.index_put((rows, cols), heavy, accumulate=True)


def coda_layers(model: nn.Module) -> list[tuple[str, CodaFFN]]:
    return targets.modules_of_type(model, CodaFFN)


@register
class Coda(BottleneckMethod):
    config_cls = CodaConfig
    # Unrouted tokens skip the FFN, so the injected model differs from the base at once.
    identity_at_init = False

    def sites(self) -> int:
        return 1

    def extra_per_block(self, hidden: int) -> int:
        return hidden  # the router

    def inject(self, model: nn.Module) -> None:
        self._routing = RoutingContext()
        super().inject(model)
        model.register_forward_pre_hook(
            MaskRecorder(self._routing, model.forward), with_kwargs=True
        )

    def adapt_block(self, model: nn.Module, name: str, block: nn.Module, d: int, r: int) -> None:
        arch = targets.architecture(model)
        try:
            ffn = block.get_submodule(arch.ffn)
            out = block.get_submodule(arch.ffn_out)
        except AttributeError:
            raise TargetError(
                f"coda: block {name!r} has no {arch.ffn!r}/{arch.ffn_out!r}; the architecture "
                "table in peft_core/targets.py does not fit this model"
            ) from None
        if arch.ffn_out.startswith(arch.ffn + "."):
            heavy = ffn  # the FFN is one module (Llama, GPT-2)
        else:
            # Split FFN (BERT): the sublayer is ffn_out(ffn(x)); run both inside CodaFFN.
            heavy = nn.Sequential(ffn, out)
            targets.set_submodule(block, arch.ffn_out, nn.Identity())
        layer = CodaFFN(heavy, d, self.config, self._routing, like_param(out))
        # A new module starts in training mode; it must follow the model's (eval: hard top-k).
        targets.set_submodule(block, arch.ffn, layer.train(ffn.training))
