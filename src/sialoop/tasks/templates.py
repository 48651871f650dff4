"""Harness templates ship inside their task's package, in its `templates/` folder."""

from importlib.resources import files


def template_source(package: str, name: str) -> str:
    """The source text of template `name` in `package`'s `templates/` folder."""
    return (files(package) / "templates" / name).read_text(encoding="utf-8")
