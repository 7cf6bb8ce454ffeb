"""The change event model, shared by every part of pgherald, and its wire formats."""

from pgherald.events.model import (
    UNCHANGED_TOAST,
    CaptureMethod,
    ChangeEvent,
    FieldChange,
    OldValuesSource,
    Operation,
    RowImage,
    TypedLoader,
    Unchanged,
)

__all__ = [
    "UNCHANGED_TOAST",
    "CaptureMethod",
    "ChangeEvent",
    "FieldChange",
    "OldValuesSource",
    "Operation",
    "RowImage",
    "TypedLoader",
    "Unchanged",
]
