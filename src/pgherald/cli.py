"""The ``pgherald`` command (placeholder until the CLI lands)."""

import click


@click.group()
def main() -> None:
    """pgherald tells people and programs what changed in their PostgreSQL tables."""
