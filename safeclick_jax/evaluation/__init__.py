"""Evaluation under the paper's robustness protocol (Table 2, Fig. 3, Fig. 4).

metrics   Dice (2D per ROI, 3D per volume and label; empty-mask rule), mask-logit resizing
protocol  ROIs + identical prompts, sharded jit encode-once / decode-all-conditions loop, timing
report    results.csv / results.json / per_roi.csv / volumes_3d.csv / prompts.json / table.md
figures   Fig. 3-like robustness curves and Fig. 4-like overlays (PNG)

Entry point: evaluate.py at the repository root.
"""
