"""The bridge between model dataclasses and config sections: every preset survives a round trip
through a config section and the JSON a checkpoint saves, and None fields stay settable."""

import json

import pytest
from absl import flags
from ml_collections import config_flags

from jaxaigc.configs import fields
from jaxaigc.data.image_tokens import TokenPairsConfig
from jaxaigc.models import clip, dalle, decoder, dvae, gpt, prior

PRESETS = [
    *((clip.CLIPConfig, name) for name in clip.PRESETS),
    *((dalle.DALLEConfig, name) for name in dalle.PRESETS),
    *((decoder.DecoderConfig, name) for name in decoder.PRESETS),
    *((prior.PriorConfig, name) for name in prior.PRESETS),
    *((gpt.GPTConfig, name) for name in gpt.PRESETS),
]


@pytest.mark.parametrize("cls, name", PRESETS, ids=lambda x: getattr(x, "__name__", x))
def test_presets_round_trip_through_saved_json(cls, name):
    model = cls.from_name(name)
    saved = json.loads(json.dumps(fields.preset_section(cls, name).to_dict()))
    assert fields.to_dataclass(cls, saved) == model


@pytest.mark.parametrize("model", [*dvae.PRESETS.values(), TokenPairsConfig()])
def test_plain_dataclasses_round_trip(model):
    section = fields.section(model)
    assert fields.to_dataclass(type(model), section) == model
    assert fields.to_dataclass(type(model), json.loads(json.dumps(section.to_dict()))) == model


def test_none_fields_are_settable_from_the_command_line():
    section = fields.preset_section(clip.CLIPConfig, "tiny-vit")
    assert section.logit_bias_init is None
    argv = ["prog", "--config.logit_bias_init=-10", "--config.vision_layers=3"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", section, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    model = fields.to_dataclass(clip.CLIPConfig, flag_values.config)
    assert model.logit_bias_init == -10.0 and model.vision_layers == 3


def test_fields_left_unset_are_typed_placeholders():
    section = fields.preset_section(prior.PriorConfig, "tiny")
    fields.leave_unset(section, ("embed_dim",), int)
    assert section.embed_dim is None
    section.embed_dim = 64
    with pytest.raises(TypeError):
        section.embed_dim = "wide"


def test_unknown_fields_are_named():
    saved = {**fields.preset_section(gpt.GPTConfig, "gpt2-small").to_dict(), "widht": 3}
    with pytest.raises(ValueError, match=r"GPTConfig has no field\(s\) \['widht'\]"):
        fields.to_dataclass(gpt.GPTConfig, saved)
