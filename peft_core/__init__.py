"""peft_core: parameter-efficient fine-tuning methods behind one interface.

Pure PyTorch + transformers (no Ray, DeepSpeed or MLflow), usable on its own::

    import peft_core
    peft_model = peft_core.apply(model, {"name": "lora", "rank": 8, "alpha": 16})
    peft_model.summary()            # trainable params and fraction
    optimizer = torch.optim.AdamW(peft_model.param_groups(lr=1e-3))
    peft_model.save("out/adapter")  # adapter_config.json + adapter.safetensors
    peft_model = peft_core.load_adapter(fresh_base_model, "out/adapter")

Public API:

- :class:`MethodConfig`: base of every method's config (``validate``, ``to_dict``, ``from_dict``).
- :func:`register`, :func:`get`, :func:`available`: the method registry.
- :func:`apply` -> :class:`PeftModel`: freeze, inject, count, optimise, merge, save.
- :func:`load_adapter`, :func:`save_adapter`, :func:`export_hf`, :func:`read_adapter_config`.
- :func:`fingerprint`: the base-model identity stored with every adapter.
- :mod:`peft_core.pack`: :class:`~peft_core.pack.PackedModel` trains K LoRA-family
  adapters over one frozen base; :func:`~peft_core.pack.check_member` says whether a
  method config can be one of them.
- :data:`__version__`, written into every adapter.
- Errors: :class:`PeftError`, :class:`ConfigError`, :class:`TargetError`,
  :class:`NotMergeableError`, :class:`FingerprintMismatchError`.
"""

from . import methods  # noqa: F401  (importing the package registers the built-in methods)
from .config import MethodConfig
from .errors import (
    ConfigError,
    FingerprintMismatchError,
    NotMergeableError,
    PeftError,
    TargetError,
)
from .fingerprint import fingerprint
from .io import export_hf, load_adapter, read_adapter_config, save_adapter
from .method import Method
from .model import PeftModel, apply
from .registry import available, get, register
from .version import __version__ as __version__

__all__ = [
    "ConfigError",
    "FingerprintMismatchError",
    "Method",
    "MethodConfig",
    "NotMergeableError",
    "PeftError",
    "PeftModel",
    "TargetError",
    "apply",
    "available",
    "export_hf",
    "fingerprint",
    "get",
    "load_adapter",
    "read_adapter_config",
    "register",
    "save_adapter",
]
