"""Goals a bench judges: each printed as `met` or `NOT met`; the bench exits 1 when any is missed."""
import sys

_missed: list[str] = []


def goal(text: str, met: bool) -> None:
    """Print one measured line with its verdict, e.g. `ratio 0.031 (goal <= 0.1): met`."""
    print(f"{text}: {'met' if met else 'NOT met'}")
    if not met:
        _missed.append(text)


def verdict() -> None:
    """The bench's exit: 0 when every goal was met, 1 naming the misses otherwise."""
    if _missed:
        print(f"{len(_missed)} goal(s) NOT met", file=sys.stderr)
        sys.exit(1)
    print("every goal met")
