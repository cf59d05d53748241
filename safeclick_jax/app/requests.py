"""The API's request bodies as pydantic models: FastAPI validates them, the OpenAPI schema
(/api/docs) documents them, and a refused value is answered with 400 and one sentence naming
the field and the value (`validation_sentence`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from safeclick_jax.data.preprocess import NORMALIZATIONS
from safeclick_jax.inference.geometry import voxel_index
from safeclick_jax.inference.limits import MAX_OBJECT_ID

ObjectId = Annotated[int, Field(strict=True, ge=1, le=MAX_OBJECT_ID, description=f"object id, 1..{MAX_OBJECT_ID}")]
ObjectInPath = Annotated[int, Field(ge=1, le=MAX_OBJECT_ID, description=f"object id, 1..{MAX_OBJECT_ID}")]
Voxel = Annotated[
    list[int | float],
    AfterValidator(lambda v: voxel_index(v)),
    Field(description="voxel indices [i, j, k] of the input file (integers)"),
]
Normalization = Literal[NORMALIZATIONS]

# what a field needs, said after a refused value
NEEDS = {
    "path": "a file name relative to the data folder is needed",
    "axis": "0, 1 or 2",
    "object": f"an integer id in 1..{MAX_OBJECT_ID} is needed",
    "label": "1 (foreground) or 0 (background)",
    "box": "[u0, v0, u1, v1] voxel indices are needed",
    "slice": "an integer slice index is needed",
    "name": "1..64 characters",
}


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenVolume(Request):
    """POST /api/volumes (JSON; an upload sends `normalization` as a form field)."""

    path: str | None = Field(None, description="a file in --data-dir, relative to it")
    axis: Literal[0, 1, 2] = Field(2, description="slicing axis of the file's voxel grid")
    normalization: Normalization = Field("auto", description="intensity mapping (docs/app.md)")


class Prompt(Request):
    """POST /api/volumes/{id}/prompts: a click (`voxel`, `label`) or a box (`box`, `slice`, `axis`)."""

    object: ObjectId = 1
    voxel: Voxel | None = None
    label: Literal[0, 1] = Field(1, description="1 foreground, 0 background")
    box: list[int | float] | None = Field(None, description="[u0, v0, u1, v1]: the two other voxel axes, increasing")
    slice: Annotated[int, Field(strict=True)] | None = Field(None, description="the box's slice along `axis`")
    axis: Literal[0, 1, 2] | None = Field(None, description="the box's axis: the volume's slicing axis")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.voxel is None) == (self.box is None):
            raise ValueError("a prompt needs `voxel` (with `label`) or `box` (with `slice` and `axis`)")
        if self.box is not None and self.slice is None:
            raise ValueError("a box needs `slice`, its slice index along `axis`")
        return self


class ObjectChoice(Request):
    """Propagate, undo, redo: one object, or all (no body, `{}` or `{"object": null}`)."""

    object: ObjectId | None = None


class NewObject(Request):
    object: ObjectId | None = None
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class EditObject(Request):
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    visible: bool | None = None


def validation_sentence(errors: list[dict[str, Any]], located: bool = False) -> str:
    """pydantic's errors -> one sentence per error, naming the field and the value. `located`:
    FastAPI's errors, whose `loc` starts with where the value was (body, query, path)."""
    out, seen = [], set()
    for e in errors:
        loc = list(e.get("loc", ()))
        if located:
            loc = loc[1:]
        loc = loc[:1] + [x for x in loc[1:] if isinstance(x, int)]  # union members add type names
        if tuple(loc) in seen:  # a union's members each refuse the value: one sentence
            continue
        seen.add(tuple(loc))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            out.append("the request body must be JSON")
            continue
        if not loc and e.get("type") in ("model_type", "model_attributes_type"):
            out.append("the request body must be a JSON object")
            continue
        if not loc:
            out.append(msg)
            continue
        if loc[0] == "o":  # the object id in a URL (/objects/{o})
            loc[0] = "object"
        field = str(loc[0]) + "".join(f"[{x}]" for x in loc[1:])
        value = e.get("input")
        if e.get("type") == "extra_forbidden":
            out.append(f"{field}: unknown field")
        elif e.get("type") == "missing":
            out.append(f"{field}: missing")
        elif msg.startswith(str(loc[0])):  # the validator named the field and the value itself
            out.append(msg)
        else:
            need = NEEDS.get(loc[0])
            out.append(f"{field} {value!r}: {msg}" + (f"; {need}" if need else ""))
    return "; ".join(out)
