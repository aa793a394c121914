"""Old import path of the weight maps' shared machinery, kept for ``tools/*.py``: it is
:mod:`megatron_omni.models.weight_maps.core` (links, row plans, ``ConversionError``) with the
per-architecture maps beside it (new code imports from there)."""

from ..models.weight_maps.core import (  # noqa: F401
    ConversionError,
    Link,
    Piece,
    check_source_keys,
    export_tensors,
    full_from_plans,
    group_units,
    read_local,
    row_plan,
)
