"""Configuration: presets, overrides, strict keys, round trip."""

from __future__ import annotations

import pytest
import yaml

from medxai.config import RunConfig, list_presets, load_config, save_config
from medxai.errors import ConfigError


def test_every_preset_loads():
    assert "demo" in list_presets()
    for name in list_presets():
        config = load_config(name)
        assert config.name


def test_overrides_apply_and_coerce_types():
    config = load_config("demo", ["train.epochs=3", "augment.scale=[0.8, 1.2]", "model.pretrained=false"])
    assert config.train.epochs == 3 and config.augment.scale == (0.8, 1.2) and config.model.pretrained is False


def test_unknown_keys_are_errors_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config("demo", ["train.epoch=3"])
    with pytest.raises(ConfigError, match="not a valid int"):
        load_config("demo", ["train.epochs=three"])


def test_saved_config_reloads_identically(tmp_path):
    config = load_config("kermany", ["train.seed=7"])
    path = save_config(config, tmp_path / "config.yaml")
    assert RunConfig.from_dict(yaml.safe_load(path.read_text())) == config
