"""Counted nouns in what the tools print: `1 text`, `3 texts`, never `text(s)`."""


def plural(count: int, noun: str) -> str:
    """The count and the noun, agreeing (nouns that take an `s`)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
