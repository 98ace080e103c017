"""Figures the suite measures and prints at the end (one module object, shared by every test file)."""

FIGURES: list[str] = []


def record_figure(text: str) -> None:
    FIGURES.append(text)
