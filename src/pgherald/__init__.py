"""pgherald tells people and programs what changed in their PostgreSQL tables."""

from pgherald.errors import PgHeraldError
from pgherald.events import ChangeEvent, FieldChange, RowImage

__all__ = ["ChangeEvent", "FieldChange", "PgHeraldError", "RowImage"]
__version__ = "0.1.0"
