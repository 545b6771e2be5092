"""uvit.data: the on-disk split format (:mod:`.shards`), dataset sources (:mod:`.sources`) and
pre-training validation (:mod:`.validate`). Importing this package needs numpy only."""

from uvit.data.shards import (
    DataIntegrityError,
    Manifest,
    ShardedArrays,
    load_split_arrays,
    verify_split,
    write_split,
)
from uvit.data.validate import (
    ImageSplitExpectations,
    ValidationFailed,
    ValidationReport,
    require_valid,
    validate_image_split,
)

__all__ = [
    "DataIntegrityError",
    "ImageSplitExpectations",
    "Manifest",
    "ShardedArrays",
    "ValidationFailed",
    "ValidationReport",
    "load_split_arrays",
    "require_valid",
    "validate_image_split",
    "verify_split",
    "write_split",
]
