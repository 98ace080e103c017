"""Why a candidate was not chosen, in one line: shared by the CLI and the reports."""
from .units import format_size

BYTE_CONSTRAINTS = ("size", "download", "store")


def candidate_reason(candidate: dict, exact: bool = False) -> str:
    """`exact` writes byte counts and names the limit (terminal, Gradle); otherwise sizes are rounded (reports)."""
    if candidate["status"] == "skipped":
        return f"skipped: {candidate['reason']}"
    if candidate["status"] == "error":
        error = candidate["error"]
        return f"{error['stage']} failed: {error['message']}"
    parts = []
    for failure in candidate.get("failed", []):
        constraint, actual, limit = failure["constraint"], failure["actual"], failure["limit"]
        # The comparison reads off the numbers, so it is right for lower-is-better metrics (kl) too.
        sign = ">" if actual > limit else "<"
        if constraint in BYTE_CONSTRAINTS:
            shown = (f"{actual} B", f"limit {limit} B") if exact else (format_size(actual), format_size(limit))
        elif constraint == "latency":
            shown = (f"{actual:.3f} ms", f"{'limit ' if exact else ''}{limit:.3f} ms")
        else:
            shown = (f"{actual:.4f}", f"{'floor ' if exact else ''}{limit:.4f}")
        parts.append(f"{constraint} {shown[0]} {sign} {shown[1]}")
    return "; ".join(parts) or ("passes" if exact else "")
