import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxaigc import parallel
from jaxaigc.models.gpt import GPT, GPTConfig


def test_mesh_spec_fills_one_axis(devices):
    mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = parallel.make_mesh({"fsdp": 8}, devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"data": 3}, "needs 3 devices but 8 are available"),
        ({"data": -1, "fsdp": 3}, "does not divide the 8 devices"),
        ({"data": -1, "fsdp": -1}, "more than one -1"),
        ({"data": 0, "fsdp": 8}, "must be positive"),
        ({"model": 8}, "unknown mesh axes"),
    ],
)
def test_bad_mesh_specs(devices, spec, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(spec, devices=devices)


def test_rules_override_takes_precedence():
    rules = dict(parallel.make_rules({"embed": None, "mlp": ["fsdp", "tensor"]}))
    assert rules["embed"] is None
    assert rules["mlp"] == ("fsdp", "tensor")
    assert rules["heads"] == "tensor"


def test_gspmd_partitions_only_where_conv_inputs_are_sharded(devices, mesh_2x2x2):
    def uses_shardy(mesh, rules):
        with parallel.partitioner(mesh, rules):
            return jax.config.jax_use_shardy_partitioner

    sharded_inputs = parallel.make_rules({"conv_in": "fsdp"})
    assert not uses_shardy(mesh_2x2x2, sharded_inputs)
    assert uses_shardy(mesh_2x2x2, parallel.make_rules())
    assert uses_shardy(parallel.make_mesh({"data": 8}, devices=devices), sharded_inputs)
    assert jax.config.jax_use_shardy_partitioner  # restored


def test_param_shardings_from_logical_annotations(mesh_2x2x2):
    model = GPT(GPTConfig(vocab_size=64, context_length=8, width=32, layers=2, heads=4))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    shardings = parallel.logical_shardings(abstract["params"], mesh_2x2x2, parallel.make_rules())
    block = shardings["transformer"]["resblocks_0"]
    assert block["mlp"]["c_fc"]["kernel"].spec == P("fsdp", "tensor")
    assert block["mlp"]["c_proj"]["kernel"].spec == P("tensor", "fsdp")
    assert block["attn"]["query"]["kernel"].spec == P("fsdp", "tensor", None)
    assert shardings["token_embedding"].spec == P("tensor", "fsdp")
    assert block["ln_1"]["scale"].spec == P(None)
    # Every parameter leaf carries logical names (none fell back to "unannotated").
    logical = jax.tree.leaves(
        nn.get_partition_spec(abstract["params"]),
        is_leaf=lambda x: isinstance(x, P),
    )
    assert all(len(spec) > 0 for spec in logical)


def test_axis_that_does_not_divide_is_dropped(mesh_2x2x2):
    abstract = {"w": jax.ShapeDtypeStruct((3, 8), jnp.float32)}
    boxed = {"w": nn.Partitioned(abstract["w"], ("embed", "mlp"))}
    sharding = parallel.logical_shardings(boxed, mesh_2x2x2, parallel.make_rules())["w"]
    assert sharding.spec == P(None, "tensor")


def test_shard_batch_places_rows_over_data_axes(mesh_2x2x2):
    batch = {"x": np.arange(8 * 3).reshape(8, 3), "y": np.arange(8)}
    sharded = parallel.shard_batch(batch, mesh_2x2x2)
    assert sharded["x"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(sharded["x"]), batch["x"])
    assert {s.data.shape for s in sharded["x"].addressable_shards} == {(2, 3)}


def test_one_process_holds_every_row(mesh_2x2x2):
    # Several processes are tested with real ones in tests/train/test_multihost.py.
    np.testing.assert_array_equal(parallel.process_rows(mesh_2x2x2, 8), np.arange(8))
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by the data-par"):
        parallel.process_rows(mesh_2x2x2, 6)


def test_indivisible_batch_is_a_clear_error(mesh_2x2x2):
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by the data-par"):
        parallel.shard_batch({"x": np.zeros((6, 2))}, mesh_2x2x2)


def test_initialize_distributed_is_a_noop_on_one_process():
    parallel.initialize_distributed()
    assert jax.process_count() == 1
