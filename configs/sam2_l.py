"""SafeClick on sam2.1_hiera_l (python train.py --config configs/sam2_l.py[:variant,...]); see configs/common.py."""

from configs import common


def get_config(arg=None):
    return common.make("sam2.1_hiera_l", arg, cpu_image_size=128)
