"""Sizing on abstract inputs: the figures are those of the sharded program, and the scripts'
subprocess per mesh gets the mesh's device count."""

import json
import math

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxaigc import parallel
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.autoregressive import lm_loss_fn
from jaxaigc.train import sizing
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import make_train_step

MODEL = GPT(GPTConfig(vocab_size=32, context_length=8, width=32, layers=1, heads=2))
EXAMPLE = {"tokens": ((9,), jnp.int32)}


def init(rng):
    return MODEL.init(rng, jnp.zeros((1, 8), jnp.int32))


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ``jax.ShapeDtypeStruct``s."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def test_parse_mesh():
    assert sizing.parse_mesh("fsdp=16,tensor=2") == {"fsdp": 16, "tensor": 2}
    with pytest.raises(ValueError, match="'fsdp:16' is not axis=size"):
        sizing.parse_mesh("fsdp:16")


def test_sizes_the_sharded_step_and_encoder(devices):
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2}, devices=devices)
    rules = parallel.make_rules()
    tx = optax.adam(1e-3)
    step = make_train_step(lm_loss_fn(MODEL), tx, rng=jax.random.key(1))
    figures = sizing.size_train_step(step, init, tx, EXAMPLE, mesh, rules, global_batch=8)
    json.dumps(figures)  # a child process prints them

    _, _, state = create_sharded_state(init, tx, jax.random.key(0), mesh, rules, materialize=False)
    batch = sizing.abstract_batch(EXAMPLE, 8, mesh)
    assert batch["tokens"].shape == (8, 9)
    assert batch["tokens"].sharding.spec == parallel.batch_sharding(mesh, 2).spec
    assert figures["params"] == sum(x.size for x in jax.tree.leaves(state.params))
    assert figures["params_per_device"] < figures["params"] / 2  # sharded, not replicated
    # The arguments are one device's shards of the state and the batch; the state is donated.
    assert figures["argument"] == shard_bytes((state, batch))
    assert 0 < figures["alias"] <= figures["output"]
    assert figures["peak"] == (
        figures["argument"] + figures["output"] + figures["temp"] - figures["alias"]
    )
    assert figures["flops"] > 0
    assert figures["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and figures["devices"] == 8

    tokens = sizing.abstract_batch({"tokens": ((8,), jnp.int32)}, 8, mesh)["tokens"]
    forward = sizing.size_inference(
        lambda params, tokens: MODEL.apply({"params": params}, tokens),
        (state.params, tokens),
        mesh,
        rules,
    )
    assert forward["argument"] == shard_bytes((state.params, tokens))
    assert forward["alias"] == 0 and forward["compile_s"] > 0

    row = sizing.markdown_row({**figures, "accum": 2}, limit_gib=1.0)
    assert row.startswith("| fsdp 4 x tensor 2 (8) | 2 (1/device) |") and row.endswith("| yes |")


CHILD = """
import json, sys
import jax
print("noise")
print(json.dumps({"devices": jax.device_count(), "argv": sys.argv[1:]}))
"""


def test_run_child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    result = sizing.run_child(
        str(script), "fsdp=2,tensor=3", accum=4, global_batch=12, timeout=120, extra=["--x=1"]
    )
    assert result["devices"] == 6
    argv = ["--one", "fsdp=2,tensor=3", "--accum", "4", "--global-batch", "12", "--x=1"]
    assert result["argv"] == argv
    script.write_text("import sys; sys.exit('no room')")
    failed = sizing.run_child(str(script), "fsdp=2", accum=1, global_batch=2, timeout=120)
    assert failed == {"mesh": "fsdp=2", "accum": 1, "error": "exit 1: no room"}
    row = sizing.markdown_row(failed, limit_gib=1.0)
    assert row == "| fsdp=2 | 1 | - | - | - | - | - | exit 1: no room |"
