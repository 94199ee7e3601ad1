"""Checkpoints: restore onto other meshes, corrupt and partial checkpoints."""

import jax
import pytest

from jaxaigc import parallel
from jaxaigc.configs import lm as lm_config
from jaxaigc.systems import lm
from jaxaigc.train.checkpoint import Checkpointer, CheckpointError
from jaxaigc.train.optim import make_optimizer
from jaxaigc.train.state import create_sharded_state
from tests.helpers import assert_trees_equal


def tiny_task():
    config = lm_config.get_config()
    config.model.update(context_length=16, width=32, layers=2, heads=4)
    return lm.build(config)[1]


def sharded_state(mesh, *, materialize=True, seed=0):
    tx, _ = make_optimizer(peak_lr=1e-3, total_steps=10)
    return create_sharded_state(
        tiny_task().init,
        tx,
        jax.random.key(seed),
        mesh,
        parallel.make_rules(),
        use_ema=True,
        materialize=materialize,
    )


@pytest.fixture
def saved(tmp_path, mesh_2x2x2):
    """Checkpoints at steps 1 and 2 written from the 8-device mesh (different states)."""
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_every=1)
    states = {}
    for step in (1, 2):
        states[step], _, _ = sharded_state(mesh_2x2x2, seed=step)
        checkpointer.save(step, states[step], data_state={"next": step}, config={"seed": step})
    checkpointer.wait()
    checkpointer.close()
    return tmp_path / "checkpoints", jax.device_get(states)


@pytest.mark.parametrize("spec", [{"fsdp": 4, "tensor": 2}, {"data": 1}])
def test_restore_onto_another_mesh(saved, devices, spec):
    directory, states = saved
    mesh = parallel.make_mesh(spec, devices=devices if "fsdp" in spec else devices[:1])
    _, shardings, abstract = sharded_state(mesh, materialize=False)
    checkpointer = Checkpointer(directory, save_every=1)
    step, state, data_state = checkpointer.restore_latest(abstract)
    assert step == 2 and data_state == {"next": 2}
    assert_trees_equal(jax.device_get(state), states[2])
    restored = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state))
    assert restored == jax.tree.leaves(shardings)


def corrupt(directory, step):
    """Truncates every array file of the state item, as a crash mid-write or a bad disk would."""
    files = [p for p in (directory / str(step) / "state").rglob("*") if p.is_file()]
    data = [p for p in files if p.stat().st_size > 0 and "metadata" not in p.name]
    assert data, files
    for path in data:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def test_corrupt_latest_is_reported_and_the_previous_restored(saved, mesh_2x2x2, capsys):
    directory, states = saved
    corrupt(directory, 2)
    _, _, abstract = sharded_state(mesh_2x2x2, materialize=False)
    checkpointer = Checkpointer(directory, save_every=1)
    step, state, _ = checkpointer.restore_latest(abstract)
    assert step == 1
    assert_trees_equal(jax.device_get(state), states[1])
    assert "checkpoint at step 2" in capsys.readouterr().out
    # Nothing is deleted: the damaged checkpoint is kept aside for inspection.
    assert [p.name.split("-")[0] for p in (directory.parent / "corrupt_checkpoints").iterdir()] == [
        "2"
    ]
    assert checkpointer.all_steps() == [1]


def test_all_checkpoints_corrupt_is_an_error(saved, mesh_2x2x2):
    directory, _ = saved
    corrupt(directory, 1)
    corrupt(directory, 2)
    _, _, abstract = sharded_state(mesh_2x2x2, materialize=False)
    with pytest.raises(CheckpointError, match=r"none of the checkpoints \[1, 2\]"):
        Checkpointer(directory, save_every=1).restore_latest(abstract)


def test_saving_small_replicated_arrays_compiles_nothing(tmp_path, devices):
    """Orbax's replica-parallel write slices each replicated array per replica with an eagerly
    compiled program; arrays under the 1 MiB a replica threshold are written whole instead."""
    state, _, _ = sharded_state(parallel.make_mesh({"data": 8}, devices=devices))
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        checkpointer = Checkpointer(tmp_path / "checkpoints", save_every=1)
        checkpointer.save(1, state, data_state={}, config={}, force=True)
        checkpointer.wait()
        checkpointer.close()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
