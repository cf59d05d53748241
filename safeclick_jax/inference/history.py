"""Each object's state (prompts and memory) and its undo / redo history.

An undo step is a whole ObjectState: values are replaced, never mutated in place, so keeping the
state before an interaction is keeping a reference (the memory bank's device arrays are immutable;
propagation works on a copy).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

HISTORY_DEPTH = 32  # undo steps kept per object (each propagation step holds a bank version)


@dataclasses.dataclass
class ObjectState:
    """One object's prompts and memory."""

    bank: dict  # video.empty_bank: memory, pointers, low-res logits of every slice
    kind: np.ndarray  # host copy of bank["kind"] (0 nothing, 1 tracked, 2 conditioning)
    points: dict = dataclasses.field(default_factory=dict)  # slice -> (coords [P,2] slice px, labels [P])
    masks: dict = dataclasses.field(default_factory=dict)  # slice -> mask prompt, bool [S,S] (model input)
    pending: dict = dataclasses.field(default_factory=dict)  # slice -> (low [1,4E,4E], ptr, score): not in memory
    cond: list = dataclasses.field(default_factory=list)  # conditioning slices in memory (sorted)
    tracked: dict = dataclasses.field(default_factory=dict)  # slice -> tracked in reverse?

    def copy(self) -> "ObjectState":
        return ObjectState(
            self.bank,
            self.kind.copy(),
            dict(self.points),
            dict(self.masks),
            dict(self.pending),
            list(self.cond),
            dict(self.tracked),
        )

    @property
    def has_prompts(self) -> bool:
        return bool(self.pending or self.cond)

    def changed_slices(self) -> list[int]:
        """Slices prompted since the last propagation (for an object never propagated: all)."""
        return sorted(set(self.pending) | (set() if self.tracked else set(self.cond)))


class History:
    """The objects of a session by id, with an undo and a redo stack each. A call (one click, one
    propagation of several objects) has a number; undo without an id undoes the last call."""

    def __init__(self):
        self.objects: dict[int, ObjectState] = {}
        self._undo: dict[int, list] = {}
        self._redo: dict[int, list] = {}
        self._calls = itertools.count(1)
        self._seq = itertools.count(1)

    def next_call(self) -> int:
        return next(self._calls)

    def add(self, obj_id: int, state: ObjectState) -> None:
        """A new object with an empty history."""
        self.objects[obj_id] = state
        self._undo[obj_id], self._redo[obj_id] = [], []

    def remove(self, obj_id: int) -> None:
        del self.objects[obj_id], self._undo[obj_id], self._redo[obj_id]

    def record(self, obj_id: int, call: int, what: str, before: ObjectState, after: ObjectState) -> None:
        """Installs `after` as the object's state; `before` becomes an undo step."""
        self.objects[obj_id] = after
        self._undo[obj_id].append({"call": call, "what": what, "state": before})
        del self._undo[obj_id][:-HISTORY_DEPTH]
        self._redo[obj_id] = []

    def undo(self, obj_id: int | None = None) -> str:
        return self._step(obj_id, self._undo, self._redo, "undo")

    def redo(self, obj_id: int | None = None) -> str:
        return self._step(obj_id, self._redo, self._undo, "redo")

    def _step(self, obj_id, src: dict, dst: dict, verb: str) -> str:
        if obj_id is None:
            tops = {k: v[-1] for k, v in src.items() if v}
            if not tops:
                raise ValueError(f"nothing to {verb}")
            key = "call" if verb == "undo" else "seq"
            last = max(e[key] for e in tops.values())
            ids = sorted(k for k, e in tops.items() if e[key] == last)
        else:
            ids = [obj_id]
            if not src[obj_id]:
                raise ValueError(f"nothing to {verb} for object {obj_id}")
        done, seq = [], next(self._seq)
        for k in ids:
            e = src[k].pop()
            dst[k].append({**e, "state": self.objects[k], "seq": seq})
            self.objects[k] = e["state"]
            done.append(f"{e['what']} of object {k}")
        return ", ".join(done)

    def entries(self, obj_id: int) -> list[str]:
        """The object's undoable interactions, oldest first."""
        return [e["what"] for e in self._undo[obj_id]]
