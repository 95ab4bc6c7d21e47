"""Adapter folders: safetensors only, atomic writes, refusal to load onto another base."""

from __future__ import annotations

import json

import pytest
import torch

import peft_core
from tests import tiny


def test_folder_contents_and_config(tmp_path) -> None:
    pm = peft_core.apply(tiny.model("llama"), {"name": "lora", "rank": 4, "alpha": 8})
    pm.save(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["method"] == {"name": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0,
                             "use_rslora": False, "init": "kaiming", "target_modules": None,
                             "train_head": True}
    assert cfg["peft_core_version"] == peft_core.__version__
    assert cfg["base_model"]["model_type"] == "llama"
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes()[:8] != b"\x80\x02"  # not a pickle
    from safetensors.torch import load_file

    state = load_file(tmp_path / "a" / "adapter.safetensors")
    assert set(state) == {n for n, _ in pm.trainable_parameters()}
    assert all(not k.startswith("model.embed") for k in state)  # no base weights


def test_loading_onto_another_base_names_the_field(tmp_path) -> None:
    peft_core.apply(tiny.model("llama"), {"name": "lora"}).save(tmp_path / "a")
    with pytest.raises(peft_core.FingerprintMismatchError, match="weights_sha256"):
        peft_core.load_adapter(tiny.model("llama", seed=1), tmp_path / "a")
    with pytest.raises(
        peft_core.FingerprintMismatchError, match="num_hidden_layers: adapter expects 2"
    ):
        peft_core.load_adapter(_three_layers(), tmp_path / "a")


def _three_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2,
        )
    )


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch) -> None:
    pm = peft_core.apply(tiny.model("llama"), {"name": "lora"})
    pm.save(tmp_path / "a")
    before = (tmp_path / "a" / "adapter.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("peft_core.files.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        pm.save(tmp_path / "a")
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp folder left behind


def test_not_an_adapter_folder(tmp_path) -> None:
    with pytest.raises(peft_core.PeftError, match="not an adapter folder"):
        peft_core.load_adapter(tiny.model("llama"), tmp_path)


def test_atomic_file_writes_replace_whole_files(tmp_path) -> None:
    from peft_core.files import atomic_write_bytes, atomic_write_text

    path = tmp_path / "sub" / "state.json"
    assert atomic_write_text(path, "{\"a\": \"é\"}") == path
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": "é"}
    atomic_write_bytes(path, b"{}")
    assert path.read_bytes() == b"{}"
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temp file left


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path) -> None:
    from peft_core.files import atomic_file

    path = tmp_path / "driver.pid"
    path.write_text("1")
    with pytest.raises(OSError, match="disk full"), atomic_file(path) as tmp:
        # a reader globbing the target's suffix never sees the half-written file
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp")
        assert sorted(tmp_path.glob("*.pid")) == [path]
        tmp.write_text("2")
        raise OSError("disk full")
    assert path.read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["driver.pid"]


def test_atomic_files_get_the_permissions_of_a_plain_write(tmp_path) -> None:
    import os
    import stat

    from peft_core.files import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    mode = stat.S_IMODE
    assert mode(os.stat(atomic).st_mode) == mode(os.stat(plain).st_mode)
