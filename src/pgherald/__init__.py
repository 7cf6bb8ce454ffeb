"""pgherald tells people and programs what changed in their PostgreSQL tables."""

from typing import TYPE_CHECKING, Any

from pgherald.errors import PgHeraldError
from pgherald.events import ChangeEvent, FieldChange, RowImage

if TYPE_CHECKING:
    from pgherald.api import Herald
    from pgherald.sources.listen import Listener, Notification

__all__ = [
    "ChangeEvent",
    "FieldChange",
    "Herald",
    "Listener",
    "Notification",
    "PgHeraldError",
    "RowImage",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The API pulls in capture and the store; the CLI and the event model need neither.
    if name == "Herald":
        from pgherald.api import Herald

        return Herald
    if name in ("Listener", "Notification"):
        from pgherald.sources import listen

        return getattr(listen, name)
    raise AttributeError(f"module 'pgherald' has no attribute {name!r}")
