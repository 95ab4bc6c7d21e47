"""Export a registered adapter for other servers: ``peft`` (Hugging Face peft's folder),
``merged`` (full weights with the update folded in, a plain transformers folder) or
``vllm`` (a peft LoRA folder plus ``vllm.json`` with the flags vLLM needs, e.g.
``--max-lora-rank``). A method a target cannot load is refused with the reason; every
folder is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft_core
from peft_core.io import atomic_folder

from .local import ServeError, load_folder

FORMATS = ("peft", "merged", "vllm")
#: the ranks vLLM's --max-lora-rank accepts
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _has_peft_export(method_cls) -> bool:
    return method_cls.export_hf is not peft_core.Method.export_hf


def support(adapter_config: dict[str, Any], task: str) -> dict[str, str]:
    """For each format: ``"yes"`` or why not (from the method's class and the task, without
    loading any weights), plus ``vllm.max_lora_rank`` where vLLM can load it."""
    from peft_core.methods.lora import Lora

    method = adapter_config["method"]
    cls = peft_core.get(method["name"])
    out = {
        "export.peft": "yes" if _has_peft_export(cls) else
        f"no: {method['name']} has no Hugging Face peft equivalent",
        "export.merged": "yes" if cls.mergeable else
        f"no: {method['name']} keeps parameters outside the base weights (not mergeable)",
    }
    rank = int(method.get("rank", 0) or 0)
    if not issubclass(cls, Lora):
        out["export.vllm"] = f"no: vLLM loads LoRA adapters only, not {method['name']}"
    elif task == "classification":
        out["export.vllm"] = ("no: vLLM's LoRA support serves generation models, this is a "
                              "classifier")
    elif rank > VLLM_RANKS[-1]:
        out["export.vllm"] = (f"no: rank {rank} is above vLLM's largest --max-lora-rank "
                              f"{VLLM_RANKS[-1]}")
    else:
        out["export.vllm"] = "yes"
        out["vllm.max_lora_rank"] = str(next(r for r in VLLM_RANKS if r >= rank))
    return out


def export(adapter_dir: str | Path, fmt: str, dst: str | Path, *, name: str = "adapter") -> Path:
    """Write ``adapter_dir`` (an adapter folder) in format ``fmt`` at ``dst``."""
    if fmt not in FORMATS:
        raise ServeError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    cfg = peft_core.read_adapter_config(adapter_dir)
    task = cfg.get("pipeline", {}).get("task", "")
    facts = support(cfg, task)
    verdict = facts[f"export.{fmt}"]
    if verdict != "yes":
        raise ServeError(f"cannot export {cfg['method']['name']} as {fmt}: {verdict[4:]}")
    adapter = load_folder(adapter_dir)
    if fmt == "peft":
        return peft_core.export_hf(adapter.model, dst)
    if fmt == "merged":
        merged = _merged_base(adapter.model)

        def write(tmp: Path) -> None:
            merged.save_pretrained(tmp, safe_serialization=True)
            adapter.tokenizer.save_pretrained(tmp)

        return atomic_folder(dst, write)
    base = cfg["pipeline"]["model"]

    def write_vllm(tmp: Path) -> None:
        hf_cfg = adapter.model.method.export_hf(adapter.model, tmp)
        if hf_cfg.get("peft_type") != "LORA" or hf_cfg.get("modules_to_save"):
            raise ServeError(f"cannot export as vllm: the peft export is {hf_cfg.get('peft_type')} "
                             f"with modules_to_save={hf_cfg.get('modules_to_save')}")
        rank = facts["vllm.max_lora_rank"]
        (tmp / "vllm.json").write_text(json.dumps({
            "base_model": base, "lora_name": name, "max_lora_rank": int(rank),
            "command": f"vllm serve {base} --enable-lora --max-lora-rank {rank} "
                       f"--lora-modules {name}={Path(dst).resolve()}",
        }, indent=2))

    return atomic_folder(dst, write_vllm)


def _merged_base(peft_model):
    """The base model with the update folded in and every wrapper layer replaced by the base
    layer it wraps (peft_core's merge-capable wrappers keep it as ``.base``), so the module
    names, and the saved checkpoint, are the plain architecture's."""
    from peft_core import targets
    from peft_core.layers import MergeableLayer

    peft_model.merge()
    model = peft_model.base_model
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, MergeableLayer)]
    for name, layer in wrapped:
        inner = getattr(layer, "base", None)
        if inner is None:
            raise ServeError(f"cannot export as merged: layer {name} keeps no base layer")
        targets.set_submodule(model, name, inner)
    return model
