"""Under ZeRO-3 no rank ever holds the whole base model, measured as the ranks' peak RSS.

A random Llama of about 520M parameters (2.1 GB in fp32) saved as a safetensors folder is
trained for one step by the real training stage (Ray Train, 4 workers, DeepSpeed ZeRO-3,
everything partitioned). Every rank's peak resident memory up to the first step (load,
method injection, engine build: ``load_peak_mem_mb``) must stay well below the model's
bytes: the base is built partitioned and each rank reads only its own slice of the
checkpoint. Loading it whole on each rank first, as the stage did before, puts every
rank above the model's bytes by construction; ``benchmarks/scale.py`` measures both sides.

The size is the smallest at which the margin is clear with 4 ranks (partition 0.5 GB +
Ray/torch/DeepSpeed process overhead ~0.7 GB + one gathered layer < 2.1 GB);
scaling across sizes and worker counts is measured by ``benchmarks/scale.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.train import TrainConfig, train
from tests.pipelines import train_helpers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _save_llama(folder: Path) -> int:
    """A random ~520M-parameter Llama (MiniLM's vocabulary, so the test corpus fits);
    returns its fp32 bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=train_helpers.MINILM_VOCAB, hidden_size=1280,
                      intermediate_size=3456, num_hidden_layers=24, num_attention_heads=10,
                      num_key_value_heads=10, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return n * 4


def test_zero3_rank_peak_during_load_stays_below_the_model(ray_cluster, tmp_path) -> None:
    model_bytes = _save_llama(tmp_path / "llama")
    model_mb = model_bytes / 2**20
    assert model_mb > 1900  # the premise: big enough that overheads cannot blur the result
    data = train_helpers.prepared(tmp_path, "causal_lm", rows=48)
    common = dict(model={"name": str(tmp_path / "llama")}, method={"name": "lora", "rank": 4},
                  num_workers=4, cpus_per_worker=0.5, batch_size=4, micro_batch_size=1,
                  max_steps=1, eval_every=1, max_eval_batches=1, lr=1e-3, seed=0)
    z3 = train(TrainConfig.model_validate({**common, "zero": {
        "stage": 3, "param_persistence_threshold": 0}}), manifest=data, run_dir=tmp_path / "z3")
    m = z3.metrics
    # each rank holds a quarter of the parameter bytes ...
    assert m["param_mem_mb"] < 0.3 * model_mb, m
    # ... and while loading never more than that plus the process overhead and a gathered
    # layer: well below the whole model, which every rank used to load first
    assert m["load_peak_mem_mb"] < 0.9 * model_mb, (m["load_peak_mem_mb"], model_mb)
