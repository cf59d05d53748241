"""SAM 2's prompt token layout, shared by the predictor, training and evaluation.

SAM 2 (prompt_encoder.py:87-91, sam2_image_predictor.py) turns prompts into point tokens:
a box becomes two corner points with labels 2 and 3, placed before the clicks (labels 1 / 0);
with no box SAM 2 appends one (0, 0) "not a point" (label -1). This project pads token lists to
a fixed length with label PAD_LABEL (-2), which the decoder masks out, so a batch can mix prompt
kinds and a new click does not recompile.
"""

from __future__ import annotations

import numpy as np

from safeclick_jax.models.sam2 import PAD_LABEL

PROMPT_BUCKET = 8  # the predictor pads prompts to a multiple of this many tokens
BOX_LABELS = (2, 3)
NOT_A_POINT = -1


def sam2_tokens(box=None, points=None, point_labels=None, length: int | None = None, bucket: int = PROMPT_BUCKET):
    """numpy: box [B,4] (x0,y0,x1,y1) and/or points [B,N,2] with labels [B,N], already in input
    pixels -> (coords float32 [B,P,2], labels int32 [B,P]): box corners, clicks, the (0,0) pad
    point, then PAD_LABEL tokens up to `length` (default: the next multiple of `bucket`).
    Returns (None, None) without any prompt."""
    parts_c, parts_l = [], []
    if box is not None:
        box = np.asarray(box, np.float32).reshape(-1, 2, 2)
        parts_c.append(box)
        parts_l.append(np.tile(np.array([BOX_LABELS], np.int32), (box.shape[0], 1)))
    if points is not None:
        parts_c.append(np.asarray(points, np.float32))
        parts_l.append(np.asarray(point_labels, np.int32))
    if not parts_c:
        return None, None
    batch = parts_c[0].shape[0]
    parts_c.append(np.zeros((batch, 1, 2), np.float32))
    parts_l.append(np.full((batch, 1), NOT_A_POINT, np.int32))
    coords, labels = np.concatenate(parts_c, 1), np.concatenate(parts_l, 1)
    n = coords.shape[1]
    p = length if length is not None else -(-n // bucket) * bucket
    if p < n:
        raise ValueError(f"{n} prompt tokens do not fit length {p}")
    coords = np.pad(coords, ((0, 0), (0, p - n), (0, 0)))
    labels = np.pad(labels, ((0, 0), (0, p - n)), constant_values=PAD_LABEL)
    return coords, labels


def click_or_box_tokens(points, boxes, is_box):
    """One prompt per row, either a single positive click or a box, in one fixed layout
    (3 tokens) so a batch can mix both kinds: click -> [(x, y) 1, (0, 0) -1, pad -2],
    box -> [(x0, y0) 2, (x1, y1) 3, (0, 0) -1]. points [B,1,2] or [B,2], boxes [B,4], is_box [B]
    (numpy) -> (coords [B,3,2], labels [B,3])."""
    points = np.asarray(points, np.float32).reshape(-1, 1, 2)
    pc, pl = sam2_tokens(points=points, point_labels=np.ones(points.shape[:2], np.int32), length=3)
    bc, bl = sam2_tokens(box=boxes, length=3)
    is_box = np.asarray(is_box, bool)
    return (
        np.where(is_box[:, None, None], bc, pc).astype(np.float32),
        np.where(is_box[:, None], bl, pl).astype(np.int32),
    )
