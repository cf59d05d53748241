"""The generic torch <-> Flax weight map; it lives in safeclick_jax.models.weight_map (torch-free, so
the package can load torch-layout tensors itself) and is re-exported here for the converters."""

from safeclick_jax.models.weight_map import (  # noqa: F401
    WeightMapError,
    load_state_dict,
    model_keys,
    state_dict,
    to_flax_layout,
    to_torch_layout,
    torch_key,
)
