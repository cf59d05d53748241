"""What a training task gives the loop, as named values.

A task is (data source, step function, evaluation), chosen by `config.task.name`:

    slices  SafeClick / SAM 2's decoder on single slices with one prompt each (the paper's
            recipe; the encoder frozen, its features cached): training/slice_task.py
    clips   the whole SAM 2 (encoder, memory path, decoder) on T-slice clips with K objects, as
            sam2's SAM2Train: training/clip_task.py

`loop.train` calls the task's methods in order: `check` (bad input, before anything is
written), `build` (model and what trains), `data` (the training iterator and the validation
choice), `optimizer`, `steps` (compiled train step and evaluation), and at the end `export_model`
(the image model and the memory path, torch-keyed as a model directory's `extra`, for the export).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol


class ConfigError(ValueError):
    """A config value the run cannot use; train.py prints it as one line and exits 2."""


class Env(NamedTuple):
    """The run's fixed surroundings (loop._start)."""

    workdir: Any  # pathlib.Path
    main: bool  # process 0: writes files and logs
    mesh: Any  # jax.sharding.Mesh, one `data` axis
    n_dev: int
    n_proc: int
    image_size: int
    global_batch: int  # items (ROIs or clips) per step over all processes
    local_batch: int  # per process


class Model(NamedTuple):
    """The split model (task.build)."""

    graphdef: Any
    params: Any  # trainable nnx.State
    frozen: Any  # frozen nnx.State


class Data(NamedTuple):
    """The training data and the validation choice (task.data)."""

    iterator: Any  # next() -> host batch; get_state() / set_state() for exact resume
    n_train: int  # training items per process (one epoch)
    n_val: int  # validation items (0 without validation)
    val_source: str | None  # 'val', 'holdout' (part of the training volumes) or None
    unit: str  # what an item is, for log lines: 'ROIs', 'clips'


class Placed(NamedTuple):
    """Train state and frozen weights on the devices (loop._place)."""

    state: Any  # {"params", "opt_state", "step", "rng"}
    frozen: Any
    state_sharding: Any
    frozen_sharding: Any


class Steps(NamedTuple):
    """Compiled functions (task.steps)."""

    train: Callable  # (state, frozen, host batch) -> (state, metrics): places the batch, runs the step
    evaluate: Callable | None  # (params, frozen) -> {"val_dice", ...}; None without validation
    log_keys: tuple[str, ...]  # metrics written to metrics.jsonl (besides step, epoch, rates)


class Task(Protocol):
    name: str

    def check(self, log) -> None: ...  # bad input, found before anything is written

    def build(self, log) -> Model: ...

    def data(self, log) -> Data: ...

    def optimizer(self, total_steps: int, log) -> tuple[Any, Callable]: ...  # (optax transform, lr schedule)

    def steps(self, graphdef, placed: Placed, optimizer, schedule, data: Data) -> Steps: ...

    def export_model(self, graphdef, params, frozen) -> tuple[Any, dict]: ...  # (image model, memory `extra`)
