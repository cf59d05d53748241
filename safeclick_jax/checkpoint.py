"""Model checkpoints on disk: an orbax item with the weights plus a JSON description.

Layout of a model directory (written by `convert.sam2_to_flax` and by training's export):

    DIR/model.json   {"format": 1, "kind": "sam2" | "safeclick", "sam2": SAM2Config, ...}
    DIR/state/       orbax: {"params": {path...: array}, "extra": {torch key parts...: array}}

`params` holds every Param/Buffer of the Flax model under its attribute path (all keys strings).
`extra` carries checkpoint tensors the Flax model does not use yet (SAM 2's memory/video
modules), keyed by their torch key split on '.', so nothing from the source file is dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

FORMAT = 1


class ModelDirError(ValueError):
    """A model directory that cannot be loaded: missing, empty, truncated or not matching its
    model.json. The message is one line naming the directory, the array and the cause."""


def exit_on_model_error(error: BaseException, code: int = 2):
    """What every CLI does with a ModelDirError: its one line on stderr, exit status `code`."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(code)


def _is_orbax_leftover(u) -> bool:
    """An 'Exception ignored' report from a failed orbax restore: its other reads, still pending
    when orbax's event loop closed, finalised later (the restore itself raised the real error)."""
    if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
        return True
    code = getattr(u.object, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


def _install_unraisable_filter() -> None:
    hook = sys.unraisablehook
    if getattr(hook, "_drops_orbax_leftovers", False):
        return

    def filtered(u):
        if not _is_orbax_leftover(u):
            hook(u)

    filtered._drops_orbax_leftovers = True
    sys.unraisablehook = filtered


@contextlib.contextmanager
def quiet_orbax():
    """Around a load: absl logging is silenced (orbax logs each restore at INFO/WARNING, and a failed
    read at ERROR with its traceback; the failure itself comes back as the exception, which the
    caller reports in one line), and the tracebacks a failed restore's pending reads print when
    collected later ('Event loop is closed', hundreds of lines) are dropped; every other unraisable
    error is still reported."""
    import gc

    from absl import logging as absl_logging

    _install_unraisable_filter()
    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    except BaseException:
        gc.collect()  # finalise the failed restore's coroutines now
        # reads still pending in orbax's event loop report their (same) failure through the asyncio
        # logger when the loop is collected, possibly at exit: the exception raised here says it once
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise
    finally:
        absl_logging.set_verbosity(before)


_TS_KEY = re.compile(r'Error reading "([^"/]+)[^"]*"')
_TS_RANGE = re.compile(r"byte range \[(\d+), (\d+)\) is not valid for value of size (\d+)")


def describe_restore_error(e: BaseException) -> str:
    """A one-line cause from an orbax / tensorstore restore error (which array, what is wrong)."""
    chain, x = [], e
    while x is not None and len(chain) < 8:  # orbax wraps tensorstore's error
        chain.append(x)
        x = x.__cause__ or x.__context__
    text = " ".join(str(x) for x in chain)
    msg = next((str(x) for x in reversed(chain) if str(x).strip()), type(e).__name__).strip().splitlines()[0]
    key = _TS_KEY.search(text)
    array = f"array {key.group(1).replace('.', '/')}: " if key else ""
    rng = _TS_RANGE.search(text)
    if rng:
        return f"{array}a data file is truncated (needs bytes up to {rng.group(2)}, has {rng.group(3)})"
    if "Truncated" in text or "FAILED_PRECONDITION" in text:
        detail = msg.rsplit('": ', 1)[-1]
        return f"{array}a data file is missing or truncated ({detail[:150]})"
    if "NOT_FOUND" in text or any(isinstance(x, FileNotFoundError) for x in chain):
        return f"{array}a file is missing ({msg[:200]})"
    return f"{array}{type(e).__name__}: {msg[:300]}"


def _str_keys(flat: dict) -> dict:
    return {tuple(str(p) for p in k): v for k, v in flat.items()}


def model_params(model: nnx.Module) -> dict:
    """Nested dict (string keys) of all of `model`'s variables as numpy arrays."""
    flat = {path: np.asarray(var[...]) for path, var in nnx.state(model).flat_state()}
    return traverse_util.unflatten_dict(_str_keys(flat))


def assign_params(model: nnx.Module, params: dict, where: str = "checkpoint") -> None:
    """Copies a nested `params` dict into `model` in place; every variable must be present with
    its exact shape, and no extra entry may be left over."""
    given = traverse_util.flatten_dict(params)
    state = nnx.state(model)
    flat = dict(state.flat_state())
    missing, mismatched, new = [], [], {}
    for path, var in flat.items():
        k = tuple(str(p) for p in path)
        if k not in given:
            missing.append("/".join(k))
            continue
        v = given[k]
        if tuple(v.shape) != tuple(var.shape):
            mismatched.append(f"{'/'.join(k)} {tuple(v.shape)} vs model {tuple(var.shape)}")
            continue
        new[path] = jax.numpy.asarray(v, dtype=var.dtype)
    unexpected = sorted("/".join(k) for k in set(given) - {tuple(str(p) for p in p_) for p_ in flat})
    if missing or mismatched or unexpected:
        parts = [
            f"{len(v)} {name} (first: {v[0]})"
            for name, v in (("mis-shaped", mismatched), ("missing", missing), ("unexpected", unexpected))
            if v
        ]
        raise ModelDirError(f"{where}: the arrays do not match model.json: {'; '.join(parts)}")
    state.replace_by_pure_dict(traverse_util.unflatten_dict(new), replace_fn=lambda var, val: var.replace(val))
    nnx.update(model, state)


def save(directory: str, description: dict[str, Any], params: dict, extra: dict | None = None) -> None:
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    desc = {"format": FORMAT, **description}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, "state"), {"params": params, "extra": extra or {}}, force=True)
    ckpt.wait_until_finished()
    if jax.process_index() == 0:  # multi-process training: every process saves (collective), one writes
        with open(os.path.join(directory, "model.json"), "w") as f:
            json.dump(desc, f, indent=2)


def resolve(directory: str) -> str:
    """A model directory, or a training workdir whose `export/` holds the latest exported model."""
    if not os.path.isfile(os.path.join(directory, "model.json")) and os.path.isfile(
        os.path.join(directory, "export", "model.json")
    ):
        return os.path.join(directory, "export")
    return directory


def read_description(directory: str) -> dict[str, Any]:
    directory = resolve(directory)
    path = os.path.join(directory, "model.json")
    if not os.path.isdir(directory):
        raise ModelDirError(f"{directory}: no such model directory")
    if not os.path.isfile(path):
        what = "an empty directory" if not os.listdir(directory) else "no model.json"
        raise ModelDirError(
            f"{directory}: not a safeclick-jax model directory ({what}); "
            "convert a PyTorch checkpoint with `python -m convert.sam2_to_flax`"
        )
    try:
        with open(path) as f:
            desc = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{directory}: model.json is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        got = desc.get("format") if isinstance(desc, dict) else type(desc).__name__
        raise ModelDirError(f"{directory}: model.json has unsupported format {got!r} (expected {FORMAT})")
    if desc.get("kind") not in ("sam2", "safeclick") or not isinstance(desc.get("sam2"), dict):
        raise ModelDirError(
            f"{directory}: model.json names kind {desc.get('kind')!r} "
            f"{'with' if isinstance(desc.get('sam2'), dict) else 'without'} a 'sam2' section "
            "(expected kind 'sam2' or 'safeclick' and a 'sam2' section)"
        )
    return desc


def load(directory: str) -> tuple[dict[str, Any], dict, dict]:
    """Returns (description, params, extra) with numpy arrays; ModelDirError (one line) when the
    directory is missing, empty, truncated or damaged."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(resolve(directory))
    desc = read_description(directory)
    state_dir = os.path.join(directory, "state")
    if not os.path.isdir(state_dir) or not os.listdir(state_dir):
        raise ModelDirError(f"{directory}: the arrays (state/) are missing; model.json alone is not a model")
    try:
        with quiet_orbax():
            state = ocp.StandardCheckpointer().restore(state_dir)
            to_np = lambda t: jax.tree.map(np.asarray, t)
            params, extra = to_np(state.get("params", {})), to_np(state.get("extra", {}))
    except Exception as e:  # orbax / tensorstore raise ValueError, OSError, FileNotFoundError, ...
        raise ModelDirError(f"{directory}: {describe_restore_error(e)}") from None
    return desc, params, extra
