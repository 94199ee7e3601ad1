"""bfloat16 compute with float32 master weights in every model family: with ``dtype="bfloat16"``
the parameters are float32 and the matmuls and convolutions of a training step's forward and
backward passes (traced, not run) take bfloat16 operands."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core

from jaxaigc.models.clip import CLIP, CLIPConfig
from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.models.decoder import Decoder, DecoderConfig
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.models.prior import Prior, PriorConfig

BF16 = dict(dtype="bfloat16")


def _float32_matmuls(jaxpr: core.Jaxpr, found: list[str]) -> list[str]:
    """The name stacks of the dot_generals and convolutions in ``jaxpr`` (nested ones included)
    with an operand that is not bfloat16."""
    for eqn in jaxpr.eqns:
        matmul = eqn.primitive.name in ("dot_general", "conv_general_dilated")
        if matmul and any(v.aval.dtype != jnp.bfloat16 for v in eqn.invars[:2]):
            found.append(str(eqn.source_info.name_stack))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, core.ClosedJaxpr):
                    _float32_matmuls(sub.jaxpr, found)
                elif isinstance(sub, core.Jaxpr):
                    _float32_matmuls(sub, found)
    return found


def _clip(name):
    config = CLIPConfig.from_name(name, **BF16)
    images = np.zeros((2, config.image_resolution, config.image_resolution, 3), np.float32)
    return CLIP(config), (images, np.zeros((2, config.context_length), np.int32))


def _dalle():
    config = DALLEConfig.from_name("tiny", **BF16)
    text, image = np.zeros((2, config.text_len), np.int32), np.zeros((2, 64), np.int32)
    return DALLE(config), (text, image)


def _prior():
    c = PriorConfig.from_name("tiny", **BF16)
    x, text_tokens = np.zeros((2, c.embed_dim), np.float32), np.zeros((2, c.text_len, c.text_width))
    return Prior(c), (x, np.zeros(2, np.int32), text_tokens.astype(np.float32), x)


def _decoder():
    c = DecoderConfig.from_name("tiny", **BF16)
    x = np.zeros((2, c.image_size, c.image_size, c.in_channels), np.float32)
    embedding, text = np.zeros((2, c.clip_dim), np.float32), np.zeros((2, c.text_len), np.int32)
    return Decoder(c), (x, np.zeros(2, np.int32), embedding, text)


FAMILIES = {
    "clip-vit": lambda: _clip("tiny-vit"),
    "clip-rn": lambda: _clip("tiny-rn"),
    "gpt": lambda: (GPT(GPTConfig(width=32, layers=2, heads=2, **BF16)), (np.zeros((2, 12), int),)),
    "dalle": _dalle,
    "prior": _prior,
    "decoder": _decoder,
}
# Float32 by design: CLIP's contrastive logits (outside its towers) and the ResNet's one-query
# attention pool. (The dVAE's dtype covers its residual groups only: its logits and one-hot input
# convolution stay float32, as in the reference.)
_CLIP_FLOAT32 = r"^(transpose\()?jvp\(CLIP\)\)?$|/attnpool/"
FLOAT32_BY_DESIGN = {"clip-vit": _CLIP_FLOAT32, "clip-rn": _CLIP_FLOAT32}


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_keeps_float32_master_weights(family):
    model, inputs = FAMILIES[family]()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    assert {x.dtype for x in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}

    def loss(params, others):
        outputs = model.apply({**others, "params": params}, *inputs)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(outputs))

    others = {name: tree for name, tree in variables.items() if name != "params"}
    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], others).jaxpr
    by_design = re.compile(FLOAT32_BY_DESIGN.get(family, "$^"))
    assert [name for name in _float32_matmuls(jaxpr, []) if not by_design.search(name)] == []
