"""The one change-event model that sources produce and every other part consumes.

Row values are kept as PostgreSQL's own text output (what pgoutput sends, what a
snapshot compares, what the change log stores), because that form is lossless for
every type, including the ones Python has no faithful type for (intervals with
months, ``infinity`` timestamps). Typed Python values are made from it on demand
with the database driver's loaders, which a source injects as a ``TypedLoader``;
nothing pays for conversions nobody asked for on the capture hot path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, Protocol

Operation = Literal["insert", "update", "delete", "truncate", "read", "schema", "message", "gap"]
"""``read`` is a row of an initial snapshot; ``schema`` records that a table's shape changed;
``message`` is a notification received on a channel (``listen`` watches); ``gap`` says that
changes in a range of time may be missing (a replication slot was dropped or invalidated;
``meta`` names the range) and that the table's rows follow as ``read`` events."""

CaptureMethod = Literal["logical", "trigger", "snapshot", "listen"]

OldValuesSource = Literal["replica_identity", "change_log", "snapshot", "trigger", "none"]
"""Where an update's old values came from, so readers know how much to trust them."""

OPERATIONS: Final[tuple[Operation, ...]] = (
    "insert",
    "update",
    "delete",
    "truncate",
    "read",
    "schema",
    "message",
    "gap",
)


def describe_gap(meta: Mapping[str, Any]) -> str:
    """What a ``gap`` event says, in words: the range in which changes may be missing."""
    text = meta.get("uncertain")
    if isinstance(text, str) and text:
        return text
    return (
        f"changes committed between {meta.get('from_time') or meta.get('from_lsn') or '?'}"
        f" and {meta.get('to_time') or meta.get('to_lsn') or '?'} may be missing"
    )


class Unchanged:
    """Marks a TOASTed column that the server did not resend because it did not change.

    It is a distinct value, never ``None``, so nobody mistakes "not sent" for NULL.
    """

    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = Unchanged()

Text = str | None | Unchanged


class TypedLoader(Protocol):
    """Turns PostgreSQL's text output of a value of type ``type_oid`` into a Python value."""

    def __call__(self, type_oid: int, text: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """A column as the source saw it: its name, its type's OID and the type's printable name."""

    name: str
    type_oid: int
    type_name: str


class RowShape:
    """The ordered columns of one version of a table, shared by all its row images."""

    __slots__ = ("_index", "columns", "names")

    def __init__(self, columns: tuple[ColumnSpec, ...]) -> None:
        self.columns = columns
        self.names = tuple(c.name for c in columns)
        self._index = {c.name: i for i, c in enumerate(columns)}

    def index(self, name: str) -> int:
        return self._index[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self.columns)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowShape) and other.columns == self.columns

    def __hash__(self) -> int:
        return hash(self.columns)

    def __repr__(self) -> str:
        return f"RowShape({', '.join(f'{c.name}:{c.type_name}' for c in self.columns)})"


def _text_loader(type_oid: int, text: str) -> Any:
    return text


class RowImage(Mapping[str, Any]):
    """One row's values: text as PostgreSQL printed it, typed lazily on access.

    ``image["col"]`` gives the typed value (``None`` for NULL, ``UNCHANGED_TOAST``
    for an unchanged TOAST value); ``image.text("col")`` gives the text.
    """

    __slots__ = ("_loader", "_typed", "shape", "texts")

    def __init__(
        self,
        shape: RowShape,
        texts: tuple[Text, ...],
        loader: TypedLoader | None = None,
    ) -> None:
        if len(texts) != len(shape):
            raise ValueError(f"row has {len(texts)} values for {len(shape)} columns")
        self.shape = shape
        self.texts = texts
        self._loader: TypedLoader = loader or _text_loader
        self._typed: dict[int, Any] | None = None

    @classmethod
    def from_texts(
        cls,
        columns: Mapping[str, tuple[int, str]],
        values: Mapping[str, Text],
        loader: TypedLoader | None = None,
    ) -> RowImage:
        """Builds an image from ``{name: (type_oid, type_name)}`` and ``{name: text}``."""
        shape = RowShape(tuple(ColumnSpec(n, oid, tn) for n, (oid, tn) in columns.items()))
        return cls(shape, tuple(values.get(n) for n in shape.names), loader)

    def text(self, name: str) -> Text:
        return self.texts[self.shape.index(name)]

    def column(self, name: str) -> ColumnSpec:
        return self.shape.columns[self.shape.index(name)]

    def unchanged_columns(self) -> tuple[str, ...]:
        return tuple(
            n for n, t in zip(self.shape.names, self.texts, strict=True) if t is UNCHANGED_TOAST
        )

    def text_dict(self) -> dict[str, Text]:
        return dict(zip(self.shape.names, self.texts, strict=True))

    def with_loader(self, loader: TypedLoader) -> RowImage:
        return RowImage(self.shape, self.texts, loader)

    def replace_texts(self, updates: Mapping[str, Text]) -> RowImage:
        """A copy with some columns' texts replaced (used to fill unchanged TOAST values)."""
        texts = list(self.texts)
        for name, value in updates.items():
            texts[self.shape.index(name)] = value
        return RowImage(self.shape, tuple(texts), self._loader)

    def __getitem__(self, name: str) -> Any:
        i = self.shape.index(name)
        text = self.texts[i]
        if text is None or isinstance(text, Unchanged):
            return text
        if self._typed is None:
            self._typed = {}
        elif i in self._typed:
            return self._typed[i]
        value = self._loader(self.shape.columns[i].type_oid, text)
        self._typed[i] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.shape.names)

    def __len__(self) -> int:
        return len(self.shape)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RowImage):
            return self.shape.names == other.shape.names and self.texts == other.texts
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash((self.shape.names, self.texts))

    def __repr__(self) -> str:
        return f"RowImage({self.text_dict()!r})"


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One changed column of an update: typed old and new values."""

    name: str
    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One committed change of one row (or one table, for truncate and schema events).

    ``event_id`` is stable: the same change captured twice (a replay after a crash)
    gets the same id, which is what makes the change log's append idempotent.
    ``position`` is the source's own position (an LSN, a queue id, a run id) as text.
    """

    event_id: str
    watch: str
    op: Operation
    schema: str
    table: str
    key: Mapping[str, Any]
    old: RowImage | None
    new: RowImage | None
    changed: tuple[str, ...]
    xid: int | None
    position: str
    commit_time: datetime | None
    captured_at: datetime
    method: CaptureMethod
    seq: int = 0
    old_values: OldValuesSource = "none"
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def changed_fields(self) -> tuple[FieldChange, ...]:
        """Typed ``(name, old, new)`` of each changed column, where the old row is known."""
        out = []
        for name in self.changed:
            old = self.old[name] if self.old is not None and name in self.old.shape else None
            new = self.new[name] if self.new is not None and name in self.new.shape else None
            out.append(FieldChange(name, old, new))
        return tuple(out)

    @property
    def row(self) -> RowImage | None:
        """The row as it is after the change, or as it was before a delete."""
        return self.new if self.new is not None else self.old
