"""K LoRA-family members trained side by side over one frozen copy of the base model
(:class:`peft_core.pack.PackedModel`): a packed run, ``tune.pack``.

A packed run is K runs of one recipe that differ only in method config and learning rate
(a search's trials). Each micro-batch is stacked K times, the base runs once over the
stack and each member's adapter on its own rows, so the K members see the data a solo run
sees, in the same order, and start from the same seed: each follows the solo run's
trajectory up to floating-point summation order.

No DeepSpeed engine here: an engine holds one optimizer over one model, clips the joint
gradient norm and cannot drop a member's parameters in the middle of a run, and all three
would tie the members to each other. Each member has its own
:class:`~pipelines.train.members.MemberOptimizer` (DeepSpeed's ``torch`` AdamW settings,
the run's schedule, clipping on its own norm); across ranks the members' gradients are
averaged with one all-reduce per member, what ZeRO stages 0-2 do for a solo run (the
adapters are small, so their optimizer states are not worth sharding). ZeRO-3 (a
partitioned base) is refused before a packed run starts, and again here.

Early stopping: at each report the spec's ``stopper(member, report_index, metrics)`` is
asked on rank 0 for every member still training; a stopped member leaves the pack (its
tensors and optimizer state freed) and the others train on. Every checkpoint holds every
member's adapter, ``members/<name>/adapter`` (a stopped member's as it was when it
stopped), so the latest checkpoint has them all.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from .. import metrics as M
from ..evaluation import to_device
from ..members import MemberOptimizer
from ..schedule import lr_lambda
from ..worker import Worker, pipeline_info
from .base import Engine

MEMBERS_DIR = "members"
PACK_STATE = "pack_state.pt"  # each member's optimizer and scheduler state (rank 0)
#: a member's ``status`` in a report
TRAINING, STOPPED, COMPLETED = "training", "stopped early", "completed"


def member_adapter(checkpoint: str | Path, member: str) -> Path:
    """Where a packed run's checkpoint keeps ``member``'s adapter folder."""
    return Path(checkpoint) / MEMBERS_DIR / member / ckpt.ADAPTER_DIR


class PackEngine(Engine):
    """Each report carries the pack's shared figures (step, phases, memory) and
    ``members``: per member its own metrics, ``lr``, ``step`` (its last) and ``status``."""

    def __init__(self, w: Worker):
        super().__init__(w)
        if w.sharding.partitioned:
            raise ValueError("train.zero.stage: a packed run shares one whole base model; "
                             "ZeRO-3 partitions it (use stage 0, 1 or 2)")
        self.names = [m.name for m in w.spec.members]
        self.ended: dict[str, Any] = {}  # name -> Member, once out of the pack
        self.records: dict[str, dict[str, Any]] = {}  # each member's last report
        self.optimizers: dict[str, MemberOptimizer] = {}
        self.reports = 0

    def setup(self) -> None:
        from peft_core import targets
        from peft_core.pack import PackedModel

        w, config = self.w, self.w.config
        w.phases.switch("load")
        base, _ = w.sharding.load_base(config, w.info, w.ds_config, w.dtype)
        base.to(w.device)
        self.loaded()
        w.phases.switch("method")
        # counted before any member's tensors sit in the base's layers
        base_params = sum(targets.numel(p) for p in base.parameters())
        self.pack = PackedModel(base, loss_fn=w.objective.logits_loss)
        adamw = functools.partial(torch.optim.AdamW, betas=tuple(config.betas), eps=1e-8,
                                  weight_decay=config.weight_decay)
        for spec in w.spec.members:
            member = self.pack.add(spec.name, spec.method, seed=config.seed)
            self.optimizers[spec.name] = MemberOptimizer(
                member.peft, lr=spec.lr, weight_decay=config.weight_decay, optimizer=adamw,
                grad_clip=config.grad_clip,
                scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config)))
        self.own = {spec.name: _param_counts(self.pack.member(spec.name), base_params,
                                             targets.numel) for spec in w.spec.members}
        self.measure_load_peak()
        self.adapter_info = pipeline_info(config, w.info)
        self.windows = {name: M.Window() for name in self.pack.members}

    @property
    def model(self) -> Any:
        return self.pack

    @property
    def training(self) -> bool:
        return bool(self.pack.members)

    def all_members(self) -> dict[str, Any]:
        return {**{n: self.pack.member(n) for n in self.pack.members}, **self.ended}

    def own_static(self) -> dict[str, Any]:
        return {"pack_size": len(self.names)}

    # -- resume ---------------------------------------------------------------------------
    def restore(self, folder: Path) -> dict[str, Any]:
        """Every member's adapter and (still training) optimizer and scheduler state, and
        this rank's RNG; the members that had left the pack leave it again."""
        state = ckpt.read_state(folder)
        saved = (state.get("pack") or {}).get("members")
        if saved != self.names:
            raise ckpt.ResumeError(f"{folder}: a checkpoint of members {saved}, this run packs "
                                   f"{self.names}")
        optim = torch.load(folder / PACK_STATE, weights_only=True)
        for name in self.names:
            self.pack.load(name, member_adapter(folder, name))
            if name in optim:
                self.optimizers[name].load_state_dict(optim[name])
        ckpt.load_rng(folder, rank=self.w.rank)
        self.records = dict(state["pack"]["records"])
        self.reports = len(state.get("history", []))
        for name in state["pack"]["ended"]:
            self._leave(name)
        return state

    def _leave(self, name: str) -> None:
        self.ended[name] = self.pack.remove(name)
        self.optimizers.pop(name).release()

    # -- steps ----------------------------------------------------------------------------
    def train_mode(self) -> None:
        self.pack.train()

    def train_step(self, step: int) -> None:
        w, pack = self.w, self.pack
        for window in self.windows.values():
            window.start_step()
        for mb in w.batches.micro_batches(step):
            mb = to_device(mb, w.device)
            # DeepSpeed divides a micro-batch's loss by the accumulation steps: so does this
            losses = pack.backward({n: mb for n in pack.members},
                                   scale=1.0 / w.config.grad_accum)
            tokens = int(mb["attention_mask"].sum())
            for name, loss in losses.items():
                self.windows[name].add_micro(loss, 0.0, tokens)
        self._average_gradients()
        for name in pack.members:
            self.optimizers[name].step()
            self.windows[name].end_step()

    def _average_gradients(self) -> None:
        """The members' gradients averaged over the ranks (one all-reduce per member)."""
        world = self.w.world
        if world == 1:
            return
        import torch.distributed as dist

        for name in self.pack.members:
            grads = [p.grad for _, p in self.pack.member(name).peft.trainable_parameters()
                     if p.grad is not None]
            if not grads:
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    # -- reports --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, *, calibrate: bool = False) -> dict[str, dict[str, float]]:
        """Every member's evaluation (as a solo run's) from one stacked forward per batch."""
        w, pack, objective = self.w, self.pack, self.w.objective
        pack.eval()
        sums = {name: objective.eval_sums(calibrate=calibrate) for name in pack.members}
        for b in w.evals:
            if b is None:  # a rank without rows (stages 0-2 need no collective forward)
                continue
            batch = to_device(b, w.device)
            logits = pack({name: batch for name in pack.members})
            for name, lg in logits.items():
                loss = objective.logits_loss(pack.base_model, lg, batch["labels"])
                sums[name].add(float(loss), objective.weight(b), lg, b)
        pack.train()
        return {name: s.result() for name, s in sums.items()}

    def _members_report(self, step: int, evaluated: dict[str, dict[str, float]], *,
                        last: bool) -> dict[str, Any]:
        """Each evaluated member's record, then the stopper's decisions applied."""
        self.reports += 1
        for name, metrics in evaluated.items():
            window = self.windows[name].summarise() if step else {}
            self.records[name] = {**self.own[name], **window, **metrics, M.STEP: step,
                                  "lr": self.optimizers[name].lr(),
                                  "status": COMPLETED if last else TRAINING}
        for name in self._decide([] if last else self.pack.members):
            self.records[name]["status"] = STOPPED
            self._leave(name)
        for window in self.windows.values():
            window.reset()
        return {"members": {n: dict(r) for n, r in self.records.items()}}

    def _decide(self, names: list[str]) -> list[str]:
        """The members the stopper stops at this report: asked on rank 0, in member order
        (as reports reach an asynchronous scheduler), the answer broadcast to every rank."""
        stop, stopper = [], self.w.spec.stopper
        if self.w.rank == 0 and stopper is not None:
            stop = [n for n in names if stopper(n, self.reports, self.records[n])]
        if self.w.world > 1:
            import torch.distributed as dist

            box = [stop]
            dist.broadcast_object_list(box, src=0)
            stop = box[0]
        return stop

    def first_report(self, report: dict[str, Any]) -> dict[str, Any]:
        return {**report, **self._members_report(0, self.evaluate(), last=False),
                **self.memory()}

    def report(self, step: int, last: bool, base: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        with self.w.phases("eval"):
            evaluated = self.evaluate(calibrate=last)
        before = set(self.pack.members)
        report = {**base, **self._members_report(step, evaluated, last=last)}
        stopped = before - set(self.pack.members)
        report.update(self.memory())
        # a member's adapter is saved when it leaves the pack: a checkpoint then
        due = last or bool(stopped) or step % self.w.config.ckpt_every == 0 or not self.training
        return report, due

    def finalized(self, last: bool) -> bool:
        return last or not self.training

    def save(self, folder: Path, step: int, last: bool, report: dict[str, Any]) -> None:
        """Every rank its RNG state; rank 0 every member's adapter (those that left the
        pack as they were then) and the optimizer and scheduler states of those in it."""
        w = self.w
        ckpt.save_rng(folder, rank=w.rank)
        if w.rank != 0:
            return
        for name, member in self.all_members().items():
            rec = self.records.get(name, {})
            member.peft.save(member_adapter(folder, name), pipeline=self.adapter_info, training={
                "step": rec.get(M.STEP, 0), "finalized": rec.get("status") != TRAINING,
                "eval_loss": rec.get(M.EVAL_LOSS)})
        torch.save({name: opt.state_dict() for name, opt in self.optimizers.items()},
                   folder / PACK_STATE)

    def state(self) -> dict[str, Any]:
        return {"pack": {"members": self.names, "ended": sorted(self.ended),
                         "records": self.records}}


def _param_counts(member: Any, base_params: int, numel: Any) -> dict[str, Any]:
    """A member's own parameter figures: the shared base counts once in each member's total,
    as it would in the same trial run alone."""
    n = sum(numel(p) for _, p in member.peft.trainable_parameters())
    return {M.TRAINABLE_PARAMS: n, M.TRAINABLE_FRACTION: n / (base_params + n),
            "total_params": base_params + n}
