"""SafeClick on medsam2_t (python train.py --config configs/medsam2_t.py[:variant,...]); see configs/common.py.

`full` is MedSAM 2's recipe: the whole model on 8-slice clips at 512 px (the model's input size,
on a GPU/TPU; the CPU size is 128 px x 4 slices), prompted by a box or a mask on the conditioning
frames (never clicks alone), with sam2's corrective clicks.
"""

from configs import common


def get_config(arg=None):
    c = common.make("medsam2_t", arg, cpu_image_size=128)
    if c.task.name == "clips":
        c.clip.prob_to_use_box_input = 1.0  # given point input: always a box (else the mask)
    return c
