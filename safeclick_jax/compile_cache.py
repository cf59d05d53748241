"""JAX's persistent compilation cache: compiled steps are kept on disk, so the next process (a
training restart, the web app, the segment CLI) loads them instead of compiling again (the volume
engine at 512 px: 20 s of compiling -> 10 s on a 2-core CPU; benchmarks/RESULTS.md)."""

from __future__ import annotations

import os

DEFAULT_DIR = "~/.cache/safeclick_jax/xla"


def enable(path: str | None = DEFAULT_DIR) -> None:
    """Use `path` as the cache ('' or None: leave JAX's setting as it is). Every compile is kept,
    however short: the engine and the app compile many small steps."""
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
