"""Several LoRA adapters trained side by side over one frozen base model (a *pack*).

A search over LoRA hyperparameters trains K adapters on the same base. Held separately,
each copy of the base costs its full memory and every trial reloads it; packed, the base
is held once and one forward serves all K members, as multi-LoRA training systems batch
it (mLoRA, S-LoRA): member k's micro-batch is slice k of the batch dimension, the base
runs once per token row of the stacked batch, and each member's adapter runs only on its
own slice::

    pack = PackedModel(base_model)
    a = pack.add("a", {"name": "lora", "rank": 8}, seed=0)
    b = pack.add("b", {"name": "lora", "rank": 16, "alpha": 32}, seed=1)
    opt_a = torch.optim.AdamW(a.peft.param_groups(lr=1e-3))   # one optimizer per member
    opt_b = torch.optim.AdamW(b.peft.param_groups(lr=3e-4))
    losses = pack.backward({"a": batch_a, "b": batch_b})    # one forward, K losses
    for opt in (opt_a, opt_b):                               # (accumulating: backward per
        opt.step()                                           #  micro-batch, scale=1/n,
        opt.zero_grad()                                      #  then the steps)
    pack.remove("b")                                         # early stopping; "a" trains on
    pack.save("a", "out/a")                                  # the folder a solo run writes

Members are independent: a member's rows touch only its own parameters (the base is
frozen and a transformer mixes tokens within a sequence, never across the batch), so
backpropagating the *sum* of the members' mean losses gives each member exactly the
gradient of its own loss. Member k with ``seed=s`` starts as ``torch.manual_seed(s);
peft_core.apply(base, config_k)`` starts, so with the same data it follows the solo run's
trajectory up to floating-point summation order (the base's matmuls see a larger batch)
when it is optimised as the solo run is: its own optimizer over ``member.peft.param_groups``
and, if clipped, on its own gradient norm (clipping the pack's joint norm would tie the
members to each other). This module is the model side only; the optimizer, schedule and
clipping are the caller's (peft-pipelines' training stage: ``pipelines/train/members.py``).
LoRA dropout draws from the shared RNG stream, so a member with ``dropout > 0`` trains as
well as alone but not bit-for-bit as a solo run does.

Members may differ in method (``lora``, ``lora_plus``, ``moslora``), rank, alpha, init
(``kaiming``/``gaussian``), dropout, ``target_modules`` and ``train_head``: a new task head
(sequence classification) is copied per member, the base's head staying frozen.
Methods that write the base (``full``, selective deltas, PiSSA/OLoRA's residual) cannot
share it and are refused, as are methods whose layers compute otherwise (DoRA, IA3, ...).
Not supported: gradient checkpointing (a re-forward would not know the batch layout),
merging, ZeRO-3 partitioned bases.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import targets
from .config import MethodConfig
from .errors import ConfigError, FingerprintMismatchError, PeftError
from .files import read_adapter_config, read_adapter_weights
from .fingerprint import differences, fingerprint
from .method import Method
from .methods.lora import REWRITING_INITS, Lora, LoraLayer, LoraPlus, MosLora
from .model import PeftModel
from .registry import get

#: methods a pack trains: their layers compute ``base(x) + s·B (M) A dropout(x)``
PACKABLE = {"lora": Lora, "lora_plus": LoraPlus, "moslora": MosLora}

#: ``loss_fn(model, logits, labels) -> scalar``: one member's loss from its slice
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

_NAME = re.compile(r"[A-Za-z0-9_-]+")


class _Layout:
    """Which rows of the current stacked batch belong to which member: ``(name, start,
    stop)`` in row order; shared by every packed layer of one pack, set around a forward."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int]] | None = None

    def slices(self, n: int, where: str) -> list[tuple[str, int, int]]:
        if self.rows is None:
            raise PeftError(f"{where} ran outside PackedModel.forward, so it does not know "
                            "which member each batch row belongs to; call the pack instead")
        if self.rows[-1][2] != n:
            raise PeftError(f"{where}: got {n} batch rows, the pack's layout has "
                            f"{self.rows[-1][2]} (batch must be dimension 0)")
        return self.rows


class _MemberLora(nn.Module):
    """One member's ``lora_A``, ``lora_B`` (and MoSLoRA's ``lora_M``) at one layer, under
    the names a :class:`~peft_core.methods.lora.LoraLayer` gives them."""

    def __init__(self, layer: LoraLayer):
        super().__init__()
        self.lora_A = layer.lora_A
        self.lora_B = layer.lora_B
        if layer.lora_M is not None:
            self.lora_M = layer.lora_M
        self.dropout = layer.dropout
        self.scaling = layer.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LoraLayer.lora_update(dropout(x)), the same operations in the same order
        x = self.dropout(x)
        h = self.lora_A(x.to(self.lora_A.weight.dtype))
        if hasattr(self, "lora_M"):
            h = self.lora_M(h)
        return self.lora_B(h) * self.scaling


class _PerMember(nn.Module):
    """A frozen ``base`` module beside the members' own modules, routed by the rows of the
    stacked batch each member owns (``layout``)."""

    def __init__(self, base: nn.Module, layout: _Layout, name: str):
        super().__init__()
        self.base = base
        self.members = nn.ModuleDict()
        self._layout = layout
        self._name = name


class PackedLoraLayer(_PerMember):
    """A frozen linear-like ``base`` run once over the stacked batch, plus each member's
    low-rank update on its own rows (a member without an update here gets the base's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self._layout.slices(x.shape[0], self._name)
        parts = []
        for member, start, stop in rows:
            ys = y[start:stop]
            if member in self.members:
                ys = ys + self.members[member](x[start:stop]).to(ys.dtype)
            parts.append(ys)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class PackedHead(_PerMember):
    """A new task head: each member with ``train_head`` has its own copy, started from the
    base's (as a solo run trains the base's head in place); the others use the frozen one."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = self._layout.slices(x.shape[0], self._name)
        own = dict(self.members.items())
        parts = [own.get(m, self.base)(x[s:e], *args, **kwargs) for m, s, e in rows]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclasses.dataclass
class Member:
    """One adapter of a pack. ``peft`` is a :class:`~peft_core.PeftModel` over this member's
    tensors alone, keyed as a solo run keys them (save, state dicts, param groups, summary)."""

    name: str
    config: MethodConfig
    peft: PeftModel


class PackedModel(nn.Module):
    """One frozen base model (modified in place) with K LoRA-family members side by side.

    ``loss_fn`` computes one member's loss from its logits and labels; the default is the
    base model's own (transformers' ``loss_function`` for its task), the loss a solo run's
    ``model(**batch).loss`` is.
    """

    def __init__(self, model: nn.Module, *, loss_fn: LossFn | None = None):
        super().__init__()
        if isinstance(model, (PeftModel, PackedModel)):
            raise PeftError("model: already has adapters applied; a pack starts from the "
                            "plain base model")
        if any(isinstance(m, (LoraLayer, PackedLoraLayer)) for m in model.modules()):
            raise PeftError("model: contains LoRA layers already; a pack starts from the "
                            "plain base model")
        self.base_fingerprint = fingerprint(model)  # before any change, as apply() takes it
        targets.keep_4bit_layers_differentiable(model)  # as apply() does
        model.requires_grad_(False)
        self.base_model = model
        self.loss_fn = loss_fn or hf_loss
        self._layout = _Layout()
        self._members: dict[str, Member] = {}

    # -- members ----------------------------------------------------------------------------
    @property
    def members(self) -> list[str]:
        """Names of the members still training, in batch-row order."""
        return list(self._members)

    def member(self, name: str) -> Member:
        try:
            return self._members[name]
        except KeyError:
            raise PeftError(f"member {name!r}: not in the pack (members: "
                            f"{self.members})") from None

    def add(
        self,
        name: str,
        config: MethodConfig | Mapping[str, Any],
        *,
        seed: int | None = None,
    ) -> Member:
        """Add a member: its adapter initialised as ``torch.manual_seed(seed)`` followed by
        ``peft_core.apply(base, config)`` would (the global RNG when ``seed`` is None). Its
        optimizer is the caller's, over ``member.peft.param_groups(lr)`` as a solo run's."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"member name: expected letters, digits, '_' or '-', got {name!r}")
        if name in self._members:
            raise ConfigError(f"member name: {name!r} is already in the pack")
        cfg, method = _packable(config)
        lora_names = self._targets(cfg)
        heads = self._heads() if cfg.train_head else []
        device = next(iter(self.base_model.parameters())).device
        # Built exactly as Lora.inject builds a solo run's layers (same order, same RNG
        # draws), then the factors move into the shared layer and the wrapper is dropped.
        with _seeded(seed, device):
            for target in lora_names:
                layer = self._lora_layer(target)
                # _mixer: peft_core's own (MoSLoRA's mixer init; None for lora, lora_plus)
                solo = method.layer_cls(layer.base, cfg, method._mixer)
                layer.members[name] = _MemberLora(solo)
        for head_name in heads:
            head = self.base_model.get_submodule(head_name)
            own = copy.deepcopy(head.base).requires_grad_(True)
            head.members[name] = own
        peft = PeftModel(self._view(name), method, self.base_fingerprint)
        member = Member(name=name, config=cfg, peft=peft)
        self._members[name] = member
        return member

    def remove(self, name: str) -> Member:
        """Take a member out (early stopping): its tensors leave the pack's layers (the
        returned member's ``peft`` still holds them, to save) and the others train on
        unchanged. Its optimizer is the caller's to free."""
        member = self.member(name)
        for _, layer in self._packed_layers():
            if name in layer.members:
                del layer.members[name]
        del self._members[name]
        return member

    # -- running ----------------------------------------------------------------------------
    def forward(self, batches: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        """One forward of the base over every given member's batch stacked (``labels`` are
        not passed to the model); returns each member's logits, by name."""
        rows, inputs = self._stack(batches)
        with self._rows(rows):
            out = self.base_model(**inputs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return {m: logits[s:e] for m, s, e in rows}

    def losses(self, batches: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each member's loss on its own batch (with autograd), from one stacked forward."""
        missing = [m for m, b in batches.items() if "labels" not in b]
        if missing:
            raise PeftError(f"batch of member {missing[0]!r}: missing 'labels'")
        logits = self(batches)
        return {m: self.loss_fn(self.base_model, lg, batches[m]["labels"])
                for m, lg in logits.items()}

    def backward(self, batches: Mapping[str, Mapping[str, torch.Tensor]], *,
                 scale: float = 1.0) -> dict[str, float]:
        """Accumulate gradients of one stacked micro-batch: ``scale`` × the sum of the
        members' losses, backpropagated once (the parameters are disjoint, so each member
        gets the gradient of its own loss). Returns the unscaled losses by name."""
        losses = self.losses(batches)
        (torch.stack(list(losses.values())).sum() * scale).backward()
        return {m: float(v.detach()) for m, v in losses.items()}

    # -- files ------------------------------------------------------------------------------
    def save(self, name: str, path: str | Path, **extra: Any) -> Path:
        """Write member ``name``'s adapter folder, the one a solo run of it writes (loads
        with :func:`peft_core.load_adapter`); ``extra`` goes in the config."""
        return self.member(name).peft.save(path, **extra)

    def load(self, name: str, path: str | Path) -> None:
        """Load an adapter folder (a member's checkpoint) into member ``name``: the folder's
        base must be this pack's and its method config the member's."""
        member = self.member(name)
        cfg = read_adapter_config(path)
        diff = differences(cfg["base_model"], self.base_fingerprint)
        if diff:
            raise FingerprintMismatchError(
                f"{path}: adapter was trained on another base model; " + "; ".join(diff))
        saved = MethodConfig.from_dict(dict(cfg["method"]))
        if saved != member.config:
            raise ConfigError(f"{path}: method config {saved.to_dict()} differs from member "
                              f"{name!r}'s {member.config.to_dict()}")
        member.peft.load_adapter_state_dict(read_adapter_weights(path))

    # -- memory -----------------------------------------------------------------------------
    def storage_bytes(self) -> dict[str, int]:
        """Bytes of parameter storage: ``base`` (held once, whatever K is) and each member's."""
        own = {n: {p.untyped_storage().data_ptr() for p in m.peft.parameters()}
               for n, m in self._members.items()}
        adapters = set().union(*own.values()) if own else set()
        sizes: dict[int, int] = {}
        for p in self.parameters():
            sizes[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        out = {"base": sum(b for ptr, b in sizes.items() if ptr not in adapters)}
        out.update({n: sum(sizes[ptr] for ptr in ptrs) for n, ptrs in own.items()})
        return out

    # -- internals --------------------------------------------------------------------------
    def _packed_layers(self) -> list[tuple[str, PackedLoraLayer | PackedHead]]:
        return [(n, m) for n, m in self.base_model.named_modules()
                if isinstance(m, (PackedLoraLayer, PackedHead))]

    def _targets(self, cfg: MethodConfig) -> list[str]:
        """The layers ``cfg`` wraps, matched as on the plain base (a layer already packed
        counts as the linear module it wraps; the modules inside packed layers never match)."""
        model = self.base_model
        inside = {id(d) for _, p in self._packed_layers() for d in p.modules() if d is not p}
        patterns = cfg.target_modules
        if patterns is None:
            patterns = list(targets.architecture(model).linear_targets)

        def candidate(m: nn.Module) -> bool:
            return isinstance(m, PackedLoraLayer) or (
                targets.is_linear_like(m) and id(m) not in inside)

        heads = set(targets.head_names(model))
        found = targets.match_modules(model, patterns, kind="linear module", predicate=candidate)
        return [n for n, _ in found if n not in heads]

    def _lora_layer(self, name: str) -> PackedLoraLayer:
        module = self.base_model.get_submodule(name)
        if not isinstance(module, PackedLoraLayer):
            module = PackedLoraLayer(module, self._layout, name)
            targets.set_submodule(self.base_model, name, module)
        return module

    def _heads(self) -> list[str]:
        names = targets.new_task_heads(self.base_model)
        for name in names:
            module = self.base_model.get_submodule(name)
            if not isinstance(module, PackedHead):
                targets.set_submodule(self.base_model, name, PackedHead(module, self._layout, name))
        return names

    def _view(self, name: str) -> nn.Module:
        """A module tree holding member ``name``'s modules at the paths a solo run has them
        (``<layer>.lora_A``, the head at its own name), in the base's module order, sharing
        the tensors (no copy), with the base's ``config``."""
        root = nn.Module()
        for path, layer in self._packed_layers():
            if name not in layer.members:
                continue
            *parents, leaf = path.split(".")
            node = root
            for part in parents:
                if not hasattr(node, part):
                    node.add_module(part, nn.Module())
                node = getattr(node, part)
            node.add_module(leaf, layer.members[name])
        root.config = getattr(self.base_model, "config", None)
        return root

    def _stack(self, batches: Mapping[str, Mapping[str, torch.Tensor]]
               ) -> tuple[list[tuple[str, int, int]], dict[str, torch.Tensor]]:
        unknown = [m for m in batches if m not in self._members]
        if unknown:
            raise PeftError(f"batches: {unknown} are not members of the pack "
                            f"(members: {self.members})")
        order = [m for m in self._members if m in batches]  # rows in member order
        if not order:
            raise PeftError("batches: empty; give one batch per member")
        first = order[0]
        keys = sorted(k for k in batches[first] if k != "labels")
        rows, start = [], 0
        for m in order:
            b = batches[m]
            got = sorted(k for k in b if k != "labels")
            if got != keys:
                raise PeftError(f"batch of member {m!r}: keys {got}, member {first!r}'s are "
                                f"{keys}; every member's batch has the same inputs")
            for k in keys:
                if tuple(b[k].shape[1:]) != tuple(batches[first][k].shape[1:]):
                    raise PeftError(
                        f"batch of member {m!r}: {k!r} has shape {tuple(b[k].shape)}, member "
                        f"{first!r}'s {tuple(batches[first][k].shape)}; the members' batches "
                        "stack along dimension 0, so pad them to one length")
            n = int(b[keys[0]].shape[0])
            rows.append((m, start, start + n))
            start += n
        inputs = {k: torch.cat([batches[m][k] for m in order]) for k in keys}
        return rows, inputs

    @contextlib.contextmanager
    def _rows(self, rows: list[tuple[str, int, int]]) -> Iterator[None]:
        self._layout.rows = rows
        try:
            yield
        finally:
            self._layout.rows = None


def check_member(config: MethodConfig | Mapping[str, Any]) -> MethodConfig:
    """The validated method config of a would-be member, or a :class:`ConfigError` naming
    the field a pack cannot take (a search checks its trials with it before starting)."""
    return _packable(config)[0]


def _packable(config: MethodConfig | Mapping[str, Any]) -> tuple[MethodConfig, Method]:
    """The validated config and its method, or a ConfigError naming the field a pack cannot
    take."""
    cfg = config if isinstance(config, MethodConfig) else MethodConfig.from_dict(dict(config))
    cfg.validate()
    method = get(cfg.name)(cfg)
    if cfg.name not in PACKABLE or type(method) is not PACKABLE[cfg.name]:
        why = ("trains or rewrites the base weights, which a pack's members share"
               if method.writes_base_weights else "computes its layers differently")
        raise ConfigError(f"method.name: {cfg.name!r} {why}; a pack takes one of "
                          f"{sorted(PACKABLE)}")
    if cfg.init in REWRITING_INITS:
        raise ConfigError(f"{cfg.name}.init: expected kaiming or gaussian in a pack "
                          f"({cfg.init} rewrites the shared base weight to its residual), "
                          f"got {cfg.init!r}")
    return cfg, method


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """The RNG seeded with ``seed`` for the block and restored after it (so adding a member
    does not move the caller's stream); with None, the caller's stream itself."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def hf_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss a transformers model computes from ``labels`` (``model(**batch).loss``), on
    one member's logits: its ``loss_function`` for causal or masked LM, sequence and token
    classification."""
    loss_type = getattr(model, "loss_type", None)
    fn = getattr(model, "loss_function", None)
    config = getattr(model, "config", None)
    if fn is None:
        raise PeftError(f"{type(model).__name__}: no transformers loss_function; pass "
                        "PackedModel(loss_fn=...)")
    # loss_type None: transformers' loss_function falls back to the causal-LM loss (GPT-2's
    # LM head model has no loss_type and relies on that)
    if loss_type in (None, "ForCausalLM", "ForMaskedLM", "ForConditionalGeneration"):
        return fn(logits=logits, labels=labels, vocab_size=config.vocab_size)
    if loss_type == "ForSequenceClassification":
        return fn(labels=labels, pooled_logits=logits, config=config)
    if loss_type == "ForTokenClassification":
        return fn(logits=logits, labels=labels, config=config)
    raise PeftError(f"{type(model).__name__}: loss type {loss_type!r} has no default in a "
                    "pack; pass PackedModel(loss_fn=...)")
