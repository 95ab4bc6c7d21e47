"""The soft-prompt family: ``prompt_tuning``, ``p_tuning``, ``prefix_tuning``, ``p_tuning_v2``.

Prompt tuning (Lester et al. 2021) learns N virtual token embeddings placed before the input.
P-tuning (Liu et al. 2021) produces them with a small MLP or LSTM encoder while training, and
folds the encoder's output into a plain table afterwards (:meth:`PTuning.finalize`). Prefix
tuning (Li & Liang 2021) learns keys and values that every attention layer sees first,
reparameterised by an MLP while training and folded likewise; P-tuning v2 (Liu et al. 2022)
learns those deep prompts directly, for classification and sequence labelling as well.
None of them is mergeable: the prompts are extra tokens, not a change of any weight.

One job a module, each using only those above it: ``configs`` (the fields), ``layout``
(facts about the base model), ``calls`` (a call's arguments), ``modules`` (the trained
modules; the one on the base model is ``peft_prompt``), ``inputs`` (input-level prompts),
``prefix`` (prefix-level prompts, a pre-filled KV cache), ``initial`` (starting values),
``export`` (Hugging Face peft's folders), ``methods`` (the four registered methods).
"""

from .configs import (
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    SoftPromptConfig,
)
from .layout import Layout, layout
from .methods import (
    InputPrompt,
    PrefixPrompt,
    PrefixTuning,
    PromptTuning,
    PTuning,
    PTuningV2,
    SoftPrompt,
)
from .modules import MODULE, PrefixMLP, PromptEncoder, PromptTable, fold

__all__ = [
    "MODULE",
    "InputPrompt",
    "Layout",
    "PTuning",
    "PTuningConfig",
    "PTuningV2",
    "PTuningV2Config",
    "PrefixMLP",
    "PrefixPrompt",
    "PrefixTuning",
    "PrefixTuningConfig",
    "PromptEncoder",
    "PromptTable",
    "PromptTuning",
    "PromptTuningConfig",
    "SoftPrompt",
    "SoftPromptConfig",
    "fold",
    "layout",
]
