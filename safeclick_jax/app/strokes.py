"""Scribbles and lassos in the HTTP API: POST /api/volumes/{id}/scribbles and .../lassos.

A stroke is a list of voxels [i, j, k] of the input file, all on one slice of the volume's
slicing axis (the page sends the voxels under the pointer as it moves). The engine turns a
scribble into clicks along it and a lasso into the mask it encloses
(safeclick_jax/inference/prompts.py); a refused stroke is answered with 400 and a sentence naming
the value, and the session keeps its state.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter
from pydantic import Field

from safeclick_jax.app.requests import ObjectId, Request, Voxel
from safeclick_jax.app.routes import AppState, Live, State, slice_answer
from safeclick_jax.app.sessions import BadInput, Session

router = APIRouter(prefix="/api")
MAX_STROKE_POINTS = 4096  # voxels per stroke: a freehand stroke across a 512-voxel slice needs far fewer

StrokePoints = Annotated[
    list[Voxel],
    Field(
        min_length=1,
        max_length=MAX_STROKE_POINTS,
        description="voxels [i, j, k] of the input file along the stroke, in drawing order, on one slice",
    ),
]


class Scribble(Request):
    """POST /api/volumes/{id}/scribbles: a freehand stroke, foreground or background."""

    object: ObjectId = 1
    points: StrokePoints
    label: Literal[0, 1] = Field(1, description="1 foreground, 0 background")


class Lasso(Request):
    """POST /api/volumes/{id}/lassos: a closed freehand contour; its inside is the slice's mask prompt."""

    object: ObjectId = 1
    points: StrokePoints


def on_slice(s: Session, what: str, points: list[list[int]]) -> tuple[int, int, np.ndarray]:
    """Voxels of one slice of the slicing axis -> (that slice's index along the axis, the slice
    image's index t, (x, y) [N, 2] on it); BadInput naming the first voxel off the volume or slice."""
    shape, axis = s.image.shape[:3], s.axis
    k = points[0][axis]
    xy = np.empty((len(points), 2), np.float64)
    for n, v in enumerate(points):
        if any(not 0 <= x < m for x, m in zip(v, shape)):
            raise BadInput(f"{what} point {n} {v} lies outside the volume (voxel indices 0..n-1 of shape {shape})")
        if v[axis] != k:
            raise BadInput(f"{what} point {n} {v} is off slice {k} of axis {axis}, where the {what} starts")
        t, xy[n, 0], xy[n, 1] = s.engine.voxel_to_slice(v)
    return k, t, xy


async def stroke_prompt(s: Session, st: AppState, o: int, what: str, points, add) -> dict:
    """add(t, xy) (the engine's add_scribble / add_lasso on slice image t) under the locks, like a
    click: the answer holds the object's mask on the stroke's slice."""
    k, t, xy = on_slice(s, what, points)

    def run():
        add(t, xy)
        return s.engine.label_slice(t)

    mask, ms = await asyncio.to_thread(st.timed, s, run)
    return slice_answer(s, o, s.axis, k, mask, ms)


@router.post("/volumes/{sid}/scribbles")
async def scribble(body: Scribble, s: Live, st: State):
    def add(t, xy):
        s.engine.add_scribble(t, xy, label=body.label, obj_id=body.object)

    return await stroke_prompt(s, st, body.object, "scribble", body.points, add)


@router.post("/volumes/{sid}/lassos")
async def lasso(body: Lasso, s: Live, st: State):
    def add(t, xy):
        s.engine.add_lasso(t, xy, obj_id=body.object)

    return await stroke_prompt(s, st, body.object, "lasso", body.points, add)
