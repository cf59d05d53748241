"""Medical volume data for SafeClick: NIfTI datasets -> ROI slices -> simulated prompts -> grain.

Steps (docs/data.md has the details):
  python -m safeclick_jax.data.synthetic --out data/synthetic        # optional default dataset
  python -m safeclick_jax.data.prepare --root DATASET_DIR --out CACHE_DIR
  ds = safeclick_jax.data.pipeline.make_dataset(CACHE_DIR, "train", image_size=1024, batch_size=8)

Batches are dicts of numpy arrays (B = batch size, S = image_size):
  image        float32 [B, S, S, 3]  SAM 2-normalised (x/255 -> resize -> (x - mean) / std)
  mask         uint8   [B, S, S]     ground truth (0/1) at input resolution
  point_coords float32 [B, 1, 2]     (x, y) in input pixels
  point_labels int32   [B, 1]        1 (positive click)
  box          float32 [B, 4]        (x0, y0, x1, y1) in input pixels
  prompt_type  int32   [B]           0 point, 1 box
  prompt_param float32 [B]           displacement fraction (point) or box scale (box)
  roi_id       int32   [B]           row of the cache's ROI index
"""

import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
    """Data settings shared by prepare, training and evaluation (override from the command line)."""
    from safeclick_jax.data import preprocess

    # Not type-safe: target_spacing is a number or 'min'/'none', axis an int or a name.
    c = ml_collections.ConfigDict(type_safe=False)
    c.roots = ["data/synthetic"]  # dataset folders (MSD layout or plain image/label pairs)
    c.cache_dir = "data/cache/synthetic"
    # prepare
    c.axis = 2  # slicing axis of the RAS volume: 0 sagittal, 1 coronal, 2 axial
    c.min_roi_area = 20  # pixels on the resampled slice; smaller slivers are no ROI
    c.normalization = "auto"  # 'auto' (CT window for CT, else percentile), 'percentile', 'ct_window'
    c.percentiles = preprocess.PERCENTILES
    c.ct_window = preprocess.CT_WINDOW  # (level, width) in HU: abdominal soft-tissue window
    c.target_spacing = "min"  # mm; 'min' = finest spacing of each volume; 'none' = keep
    c.channel = None  # channel of 4D multi-modality images (int)
    c.modality = None  # e.g. 'CT' for plain folders (MSD: from dataset.json)
    c.split_seed = 0
    c.split_ratios = (0.7, 0.1, 0.2)
    # pipeline
    c.image_size = 1024  # 1024 for SAM 2, 512 for MedSAM 2
    c.batch_size = 8
    c.shuffle_seed = 0
    c.prompt_seed = 0
    c.p_box = 0.5  # probability that a training sample gets a box prompt
    c.point_fraction_range = (0.0, 1.0)
    # Training clicks: "displaced" (the centre of mass moved by a fraction of point_fraction_range
    # times the object's radius, the paper's family; it can fall outside the object) or "inside"
    # (a uniformly drawn pixel of the mask, SAM's training click).
    c.point_mode = "displaced"
    # Training boxes: the mask's tight box. The paper fine-tunes SAM 2 and SafeClick as SAM 2 /
    # MedSAM 2 are fine-tuned, on prompts from the ground truth; scaled boxes are its test
    # conditions. Training on them, e.g. (0.5, 1.5), teaches any decoder to ignore a bad box
    # (measured on the synthetic abdomen: the fine-tuned SAM 2 then loses 8.4 Dice points at the
    # worst box instead of 25.3; benchmarks/RESULTS.md), which hides what SafeClick is for.
    c.box_scale_range = (1.0, 1.0)
    c.prompt_grid = False  # True: draw only the paper's grid values
    c.num_threads = 2  # grain read threads
    c.eval_seed = 0
    return c


# The embedded generators by the name a config gives them (data.synthetic_kind).
SYNTHETIC_KINDS = {"smoke": "synthetic", "abdomen": "synthetic_abdomen", "procedural": "procedural"}


def write_synthetic(kind: str, root, num_volumes: int, seed: int, shape=None):
    """Writes the embedded dataset `kind` (a key of SYNTHETIC_KINDS) to `root`; shape None: its own."""
    import importlib

    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"data.synthetic_kind: {kind!r} is none of {sorted(SYNTHETIC_KINDS)}")
    gen = importlib.import_module(f"safeclick_jax.data.{SYNTHETIC_KINDS[kind]}")
    return gen.write_dataset(root, num_volumes, seed, *(() if shape is None else (tuple(shape),)))
