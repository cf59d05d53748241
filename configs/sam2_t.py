"""SafeClick on sam2.1_hiera_t (python train.py --config configs/sam2_t.py[:variant,...]); see configs/common.py."""

from configs import common


def get_config(arg=None):
    return common.make("sam2.1_hiera_t", arg, cpu_image_size=128)
