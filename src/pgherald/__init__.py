"""pgherald tells people and programs what changed in their PostgreSQL tables."""

from typing import TYPE_CHECKING, Any

from pgherald.errors import PgHeraldError
from pgherald.events import ChangeEvent, FieldChange, RowImage

if TYPE_CHECKING:
    from pgherald.api import Herald

__all__ = ["ChangeEvent", "FieldChange", "Herald", "PgHeraldError", "RowImage"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The API pulls in capture and the store; the CLI and the event model need neither.
    if name == "Herald":
        from pgherald.api import Herald

        return Herald
    raise AttributeError(f"module 'pgherald' has no attribute {name!r}")
