"""One adapter trained under a DeepSpeed engine (ZeRO 0-3): the method's hooks (``prepare``
before training, ``on_step`` and ``regularizer`` every step, ``finalize`` after) called
through :class:`peft_core.PeftModel`, the method's own parameter groups optimised, the
objective's loss backpropagated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from .. import metrics as M
from ..evaluation import evaluate, final_eval, to_device
from ..schedule import lr_lambda
from ..sharding import has_hook
from ..worker import Worker, pipeline_info
from .base import Engine


class AdapterEngine(Engine):
    """A solo run: one :class:`peft_core.PeftModel` inside ``deepspeed.initialize``."""

    def __init__(self, w: Worker):
        super().__init__(w)
        self.window = M.Window()

    def setup(self) -> None:
        import deepspeed

        import peft_core

        w, config = self.w, self.w.config
        w.phases.switch("load")
        w.sharding.start(w.device)
        # The second value must live as long as the model (see Sharding.load_base).
        base, self._keep_alive = w.sharding.load_base(config, w.info, w.ds_config, w.dtype)
        self.loaded()
        w.phases.switch("method")
        torch.manual_seed(config.seed)  # identical on every rank: same seed, same batches
        peft_model = peft_core.apply(base, w.spec.method)
        peft_model.to(w.device)
        w.sharding.adapted(peft_model)
        self.common = [to_device(b, w.device)
                       for b in w.batches.common_batches(config.prepare_batches)]
        w.sharding.prepare(peft_model, self.common, w.ds_config)
        peft_model.record_adapter_keys()  # prepare may add or resize adapter tensors
        if config.gradient_checkpointing:
            peft_model.enable_gradient_checkpointing()
        self.summary = peft_model.summary()
        self.peft = peft_model

        w.phases.switch("engine")
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=peft_model,
            model_parameters=peft_model.param_groups(config.lr, config.weight_decay),
            config=w.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config)),
            dist_init_required=False,
        )
        self.measure_load_peak()
        self.adapter_info = pipeline_info(config, w.info)

    @property
    def model(self) -> Any:
        return self.peft

    def own_static(self) -> dict[str, Any]:
        s = self.summary
        return {M.TRAINABLE_PARAMS: s["trainable_params"],
                M.TRAINABLE_FRACTION: s["trainable_fraction"],
                "total_params": s["total_params"]}

    def restore(self, folder: Path) -> dict[str, Any]:
        return ckpt.load_resume_state(self.engine, folder, rank=self.w.rank, world=self.w.world,
                                      sharding=self.w.sharding)

    def train_mode(self) -> None:
        self.engine.train()

    def train_step(self, step: int) -> None:
        w, objective = self.w, self.w.objective
        self.peft.method.on_step(self.peft, step, w.config.max_steps)  # e.g. a phase change
        self.window.start_step()
        for mb in w.batches.micro_batches(step):
            mb = to_device(mb, w.device)
            loss, _ = objective.forward(self.engine, mb)
            reg = self.peft.regularizer()
            self.engine.backward(loss if reg is None else loss + reg)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            self.window.add_micro(float(loss.detach()),
                                  float(reg.detach()) if reg is not None else 0.0,
                                  int(mb["attention_mask"].sum()))
        self.window.end_step()

    def evaluate(self, *, final: bool = False) -> dict[str, float]:
        w = self.w
        if final:
            return final_eval(self.engine, self.peft, w.evals, w.fallback, w.objective,
                              w.device, partitioned=w.sharding.partitioned)
        return evaluate(self.engine, w.evals, w.fallback, w.objective, w.device)

    def first_report(self, report: dict[str, Any]) -> dict[str, Any]:
        return {**report, **self.evaluate(), **self.memory()}

    def report(self, step: int, last: bool, base: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        report = {**base, **self.window.summarise(), "lr": self.scheduler.get_last_lr()[0],
                  **self.w.batches.position(step - 1)}
        self.window.reset()
        if last or step % self.w.config.ckpt_every == 0:
            return report, True  # evaluated inside save, after finalize
        with self.w.phases("eval"):
            report.update(self.evaluate())
            report.update(self.memory())
        return report, False

    def save(self, folder: Path, step: int, last: bool, report: dict[str, Any]) -> None:
        # The order is the collectives' order on every rank: resume state (pre-finalize),
        # the method's last pass, the evaluation, the gathered adapter.
        w = self.w
        ckpt.save_resume_state(self.engine, folder, rank=w.rank)
        if last and has_hook(self.peft, "finalize"):
            with w.phases("method"):
                w.sharding.finalize(self.engine, self.peft, self.common)
        with w.phases("eval"):
            report.update(self.evaluate(final=last))
            report.update(self.memory())
        w.sharding.save_adapter(self.peft, folder / ckpt.ADAPTER_DIR, rank=w.rank,
                                pipeline=self.adapter_info,
                                training={"step": step, "finalized": last,
                                          "eval_loss": report[M.EVAL_LOSS]})
