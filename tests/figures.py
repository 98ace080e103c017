"""Figures the suite measures and prints at the end (one module object, shared by every test file).

With pytest-xdist each worker is a process of its own: figures also go to a file per process in
the folder the controller named (EDGEBUILD_TEST_FIGURES), and the controller prints them all.
"""
import os

FIGURES: list[str] = []
FOLDER_VARIABLE = "EDGEBUILD_TEST_FIGURES"


def record_figure(text: str) -> None:
    FIGURES.append(text)
    folder = os.environ.get(FOLDER_VARIABLE)
    if folder:
        with open(os.path.join(folder, f"figures-{os.getpid()}.txt"), "a", encoding="utf-8") as handle:
            handle.write(text.replace("\n", " ") + "\n")


def recorded() -> list[str]:
    """Every figure any process of this run recorded (this process's own when there is no folder)."""
    folder = os.environ.get(FOLDER_VARIABLE)
    if not folder or not os.path.isdir(folder):
        return list(FIGURES)
    lines = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as handle:
            lines += handle.read().splitlines()
    return lines
