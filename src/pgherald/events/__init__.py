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

# Lossless JSON of typed values and the wire formats (imported last: they use the model).
from pgherald.events.formats import (
    FormatError,
    encode,
    from_pgherald_json,
    to_cloudevent,
    to_debezium,
    to_pgherald_json,
    to_simple,
)
from pgherald.events.values import (
    PG_INFINITY,
    PG_NEG_INFINITY,
    PgInfinity,
    PgInterval,
    PgText,
    from_json_value,
    row_to_json,
    to_json_value,
)

__all__ += [
    "PG_INFINITY",
    "PG_NEG_INFINITY",
    "FormatError",
    "PgInfinity",
    "PgInterval",
    "PgText",
    "encode",
    "from_json_value",
    "from_pgherald_json",
    "row_to_json",
    "to_cloudevent",
    "to_debezium",
    "to_json_value",
    "to_pgherald_json",
    "to_simple",
]
