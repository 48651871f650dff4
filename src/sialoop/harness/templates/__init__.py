"""Harness templates shipped with sialoop (generation-0 harnesses of the built-in tasks)."""

from importlib.resources import files


def template_source(name: str) -> str:
    """The source text of template `name` (a file in this package)."""
    return (files(__package__) / name).read_text(encoding="utf-8")
