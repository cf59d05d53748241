"""SAM 2's image preprocessing, shared by the image and the volume predictors and the data pipeline.

SAM 2 (sam2/utils/transforms.py, sam2_image_predictor.py) scales uint8 RGB to [0, 1], resizes it
to the model's square input with antialiased bilinear interpolation (torchvision Resize, no
aspect-ratio preservation) and normalises it with the ImageNet mean and standard deviation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def preprocess(image_uint8: jax.Array, size: int) -> jax.Array:
    """HxWx3 uint8 -> [1,S,S,3]: /255, bilinear resize with antialias, ImageNet normalisation."""
    x = image_uint8.astype(jnp.float32) / 255.0
    x = jax.image.resize(x, (size, size, 3), method="linear", antialias=True)
    x = (x - jnp.asarray(IMAGE_MEAN)) / jnp.asarray(IMAGE_STD)
    return x[None]
