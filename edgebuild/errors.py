"""Errors that end a build, each carrying its documented exit code and a one-line message."""

# Exit codes, documented in the README; the CLI is the only place that turns them into exits.
EXIT_OK = 0
EXIT_BUDGET = 1      # a budget or accuracy floor was not met
EXIT_INPUT = 2       # bad manifest, bad data, bad usage
EXIT_TOOLCHAIN = 3   # a converter, quantizer or runtime failed


class EdgebuildError(Exception):
    """An expected failure: printed as one line, never with a traceback."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(EdgebuildError):
    """Bad input: a manifest, data file, model file or command-line usage."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None, field: str | None = None):
        self.file, self.line, self.column, self.field = file, line, column, field
        location = ""
        if file:
            location = file
            if line is not None:
                location += f":{line}:{column or 1}"
            location += ": "
        if field:
            location += f"{field}: "
        super().__init__(location + message)
        self.reason = message


class ToolchainError(EdgebuildError):
    """A converter, quantizer or runtime raised: names the stage, target, technique and op."""

    exit_code = EXIT_TOOLCHAIN

    def __init__(self, message: str, *, stage: str, target: str | None = None,
                 technique: str | None = None, op: str | None = None, log: str | None = None):
        self.stage, self.target, self.technique, self.op, self.log = stage, target, technique, op, log
        self.reason = message
        parts = [f"stage {stage}"]
        if target:
            parts.append(f"target {target}")
        if technique:
            parts.append(f"technique {technique}")
        where = ", ".join(parts)
        text = f"{where}: {message}"
        if op and op not in message:
            text += f" (op {op})"
        if log:
            text += f" [log: {log}]"
        super().__init__(text)

    def to_record(self) -> dict:
        """The failure as report.json stores it."""
        return {"stage": self.stage, "technique": self.technique, "op": self.op, "message": self.reason}


def first_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
