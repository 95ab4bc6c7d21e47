"""Bad method configs fail early with messages that name the field."""

from __future__ import annotations

import pytest

import peft_core
from peft_core import ConfigError, MethodConfig
from tests import tiny


def test_unknown_method_lists_available() -> None:
    with pytest.raises(ConfigError, match="unknown method 'loar'.*'lora'"):
        MethodConfig.from_dict({"name": "loar"})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "lora", "rank": 0}, "lora.rank"),
        ({"name": "lora", "rank": -2}, "lora.rank"),
        ({"name": "lora", "alpha": 0}, "lora.alpha"),
        ({"name": "lora", "dropout": 1.0}, "lora.dropout"),
        ({"name": "lora", "dropout": -0.1}, "lora.dropout"),
        ({"name": "lora", "rank": "8"}, "lora.rank"),
        ({"name": "lora_plus", "lr_ratio": 0}, "lora_plus.lr_ratio"),
        ({"name": "moslora", "mixer_init": "zeros"}, "moslora.mixer_init"),
        ({"name": "lora", "target_modules": []}, "lora.target_modules"),
    ],
)
def test_bad_values_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MethodConfig.from_dict(data)


def test_unknown_key_lists_known_fields() -> None:
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['rnak'\].*'rank'"):
        MethodConfig.from_dict({"name": "lora", "rnak": 4})


@pytest.mark.parametrize("name", peft_core.available())
def test_dict_roundtrip(name: str) -> None:
    cfg = MethodConfig.from_dict({"name": name})
    again = MethodConfig.from_dict(cfg.to_dict())
    assert again == cfg and type(again) is type(cfg)


def test_yaml_ints_accepted_for_floats() -> None:
    cfg = MethodConfig.from_dict({"name": "lora", "alpha": 32})
    assert cfg.alpha == 32.0 and isinstance(cfg.alpha, float)


def test_target_matching_nothing_lists_existing_names() -> None:
    with pytest.raises(peft_core.TargetError, match=r"matched no linear module.*q_proj"):
        peft_core.apply(tiny.model("llama"), {"name": "lora", "target_modules": ["qproj"]})


def test_apply_twice_is_an_error() -> None:
    pm = peft_core.apply(tiny.model("llama"), {"name": "lora"})
    with pytest.raises(peft_core.PeftError, match="already"):
        peft_core.apply(pm, {"name": "lora"})


def test_merge_twice_is_an_error() -> None:
    pm = peft_core.apply(tiny.model("llama"), {"name": "lora"})
    pm.merge()
    with pytest.raises(peft_core.PeftError, match="already merged"):
        pm.merge()
