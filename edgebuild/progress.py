"""Progress lines from long stages (training), written to the user's stderr even while a stage's
toolchain output is redirected into its log file."""
import os

_stream = None


def attach(fd: int) -> None:
    """Report progress to (a duplicate of) file descriptor `fd` until `detach()`."""
    global _stream
    _stream = os.fdopen(os.dup(fd), "w", encoding="utf-8", buffering=1)


def detach() -> None:
    global _stream
    if _stream is not None:
        _stream.close()
        _stream = None


def report(text: str) -> None:
    if _stream is not None:
        _stream.write(text + "\n")
