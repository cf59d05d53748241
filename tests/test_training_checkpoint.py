"""Checkpointer: the last K plus the best by val Dice are kept; restore gives back state and meta."""

import jax.numpy as jnp
import numpy as np

from safeclick_jax.training.checkpointing import Checkpointer


def test_keeps_last_k_plus_best_and_restores(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=2, keep_best=True)
    state = {"params": {"w": jnp.arange(3.0)}, "step": jnp.zeros((), jnp.int32)}
    dice = {1: 0.2, 2: 0.9, 3: 0.1, 4: 0.3, 5: None, 6: 0.4}
    for s, d in dice.items():
        ck.save(
            s,
            {"params": {"w": jnp.arange(3.0) + s}, "step": jnp.asarray(s, jnp.int32)},
            {"step": s, "data_iter": {"next_index": 10 * s}},
            d,
        )
    ck.wait()
    assert ck.latest_step() == 6
    assert sorted(ck.all_steps()) == [2, 5, 6]  # best (0.9 at step 2) + the last two
    restored, meta = ck.restore(2, state)
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), [2.0, 3.0, 4.0])
    assert int(restored["step"]) == 2 and meta["data_iter"] == {"next_index": 20}
    ck.close()
