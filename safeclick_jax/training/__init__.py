"""SafeClick training: losses, embedding cache, sharded train step, checkpointed loop.

python train.py --config configs/sam2_t.py --workdir workdir/sam2_t
# or: from safeclick_jax.training import loop; loop.train(config, workdir)
"""
