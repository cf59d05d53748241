"""SafeClick on medsam2_t (python train.py --config configs/medsam2_t.py[:variant,...]); see configs/common.py."""

from configs import common


def get_config(arg=None):
    return common.make("medsam2_t", arg, cpu_image_size=128)
