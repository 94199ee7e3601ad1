"""The dVAE recipe's training task: its data mix, and a config that selects none is named."""

import numpy as np
import pytest

from jaxaigc.configs import dvae as dvae_config
from jaxaigc.systems import dvae


def test_training_source_mixes_scenes_and_emoji():
    config = dvae_config.get_config(quick=True)
    source = dvae.training_source(config)
    emoji = len(source) - config.data.shapes
    assert emoji > 1000  # the ~1,230 training emoji, once
    config.data.emoji_repeats = 2
    assert len(dvae.training_source(config)) == config.data.shapes + 2 * emoji
    element = dvae.ImagesOnly().map(source[0])
    assert list(element) == ["images"]
    assert element["images"].shape == (32, 32, 3) and element["images"].dtype == np.uint8


def test_no_training_data_is_named():
    config = dvae_config.get_config(quick=True)
    config.data.update(dict(shapes=0, emoji_repeats=0))
    with pytest.raises(ValueError, match="config.data selects no training data"):
        dvae.build(config)
