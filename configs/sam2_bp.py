"""SafeClick on sam2.1_hiera_b+ (python train.py --config configs/sam2_bp.py[:variant,...]); see configs/common.py."""

from configs import common


def get_config(arg=None):
    return common.make("sam2.1_hiera_b+", arg, cpu_image_size=128)
