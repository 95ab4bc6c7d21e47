"""QLoRA through the real training stage: a 4-bit (NF4, double-quantized) tiny Llama under
LoRA, trained by Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers.

The loss must go down, and the saved adapter, reloaded onto the base quantized the same way,
must reproduce the reported eval loss; it also loads onto the full-precision base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peft_core
from pipelines import models
from pipelines.train import TrainConfig, train
from tests.pipelines import train_helpers

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.timeout(600)

Q4 = {"bits": 4, "type": "nf4", "double_quant": True}


def _save_llama(folder: Path) -> Path:
    """A tiny Llama 64 wide (bitsandbytes' CPU inference kernel, used by eval, needs each
    layer's input to fill a 64-value quantization block) with MiniLM's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=train_helpers.MINILM_VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _eval_loss(adapter_dir: str, model: Path, manifest, quantization) -> float:
    from pipelines.train.data import Collator, eval_batches, read_manifest, read_split
    from pipelines.train.evaluation import evaluate
    from pipelines.train.objectives import objective_for

    info = read_manifest(manifest)
    rows = read_split(info, "eval")
    collate = Collator(info)
    batches = eval_batches(rows, collate, batch_size=2, rank=0, world=1, max_batches=None)
    base = models.load_model(str(model), info.task, quantization=quantization)
    pm = peft_core.load_adapter(base, adapter_dir)
    out = evaluate(pm, batches, collate(rows[:1]), objective_for(info), torch.device("cpu"))
    return out["eval_loss"]


def test_qlora_trains_under_zero2_and_its_adapter_reloads(ray_cluster, tmp_path) -> None:
    manifest = train_helpers.prepared(tmp_path, "causal_lm", rows=80)
    model = _save_llama(tmp_path / "model")
    config = TrainConfig.model_validate(dict(
        model={"name": str(model), "quantization": Q4},
        # q/v only: after the step-0 evaluation every gradient crosses unwrapped 4-bit layers
        # (o_proj, the MLP), which bitsandbytes' CPU inference repacking would cut off
        method={"name": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        num_workers=2, batch_size=8, micro_batch_size=2, max_steps=8, lr=2e-2,
        schedule="constant", eval_every=4, eval_before_training=True, seed=0, zero={"stage": 2},
    ))
    res = train(config, manifest=manifest, run_dir=tmp_path / "run")
    losses = [r["eval_loss"] for r in res.history]
    assert losses[-1] < losses[0] - 0.1, losses
    # Reloaded onto the same 4-bit base: the reported eval loss, to rounding.
    assert _eval_loss(res.adapter_dir, model, manifest, Q4) == pytest.approx(
        res.metrics["eval_loss"], abs=1e-4)
    # Onto the full-precision base it loads too (same base, identified without the 4-bit
    # values), and stays near: the adapter learned on top of the quantization error.
    full = _eval_loss(res.adapter_dir, model, manifest, None)
    print(f"qlora eval_loss by step {losses}; reloaded on the full-precision base {full:.4f}")
    assert abs(full - res.metrics["eval_loss"]) < 0.1 * res.metrics["eval_loss"], full
    cfg = peft_core.read_adapter_config(res.adapter_dir)
    assert cfg["base_model"]["quantized"] and cfg["pipeline"]["quantization"]["bits"] == 4


def test_quantized_base_refuses_zero3_and_full() -> None:
    base = dict(model={"name": "builtin:smollm2", "quantization": Q4})
    with pytest.raises(ValueError, match="ZeRO-3"):
        TrainConfig.model_validate({**base, "zero": {"stage": 3}})
    with pytest.raises(ValueError, match="method 'full' trains the base weights"):
        TrainConfig.model_validate({**base, "method": {"name": "full"}})
    with pytest.raises(ValueError, match="apply to 4-bit quantization only"):
        TrainConfig.model_validate(
            {"model": {"name": "x", "quantization": {"bits": 8, "type": "fp4"}}})
