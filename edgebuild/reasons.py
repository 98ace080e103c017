"""Why a candidate was not chosen, in one line: shared by the CLI and the reports."""
from .policy import BYTE_CONSTRAINTS
from .units import format_size


def candidate_reason(candidate: dict, exact: bool = False) -> str:
    """`exact` writes byte counts and names the limit (terminal, Gradle); otherwise sizes are rounded (reports)."""
    if candidate["status"] == "skipped":
        return f"skipped: {candidate['reason']}"
    if candidate["status"] == "error":
        error = candidate["error"]
        return f"{error['stage']} failed: {error['message']}"
    parts = []
    for failure in candidate.get("failed", []):
        constraint, actual, limit = constraint_label(failure), failure["actual"], failure["limit"]
        if failure.get("status") == "unverified":  # this host cannot measure it: never a pass
            shown = f"{limit:.3f} ms" if constraint == "latency" else f"{limit}"
            parts.append(f"{constraint} unverified (limit {shown}): {failure['reason']}")
            continue
        # The comparison reads off the numbers, so it is right for lower-is-better metrics (kl) too.
        sign = ">" if actual > limit else "<"
        if failure["constraint"] in BYTE_CONSTRAINTS:
            shown = (f"{actual} B", f"limit {limit} B") if exact else (format_size(actual), format_size(limit))
        elif failure["constraint"] == "latency":
            shown = (f"{actual:.3f} ms", f"{'limit ' if exact else ''}{limit:.3f} ms")
        else:
            shown = (f"{actual:.4f}", f"{'floor ' if exact else ''}{limit:.4f}")
        parts.append(f"{constraint} {shown[0]} {sign} {shown[1]}")
    return "; ".join(parts) or ("passes" if exact else "")


def constraint_label(check: dict) -> str:
    """A constraint's name as lines show it; a guard names its metric and output: 'guard sqnr[box]'."""
    if check["constraint"] == "guard":
        return f"guard {check['metric']}[{check['output']}]"
    return check["constraint"]


STATUS_MARK = {"pass": "✅ pass", "fail": "❌ fail", "unverified": "⚠️ unverified"}


def check_text(check: dict) -> str:
    """One judged constraint for a report row: 'size 23.4 KB ≤ 60.0 KB', 'latency unverified: ...'."""
    constraint, actual, limit = constraint_label(check), check["actual"], check["limit"]
    if check.get("status") == "unverified":
        return f"{constraint} unverified: {check.get('reason', '')}"
    if actual is None:
        return f"{constraint}: {check.get('reason') or 'not measured'}"
    if check["constraint"] in BYTE_CONSTRAINTS:
        shown = format_size(actual), format_size(limit)
    elif check["constraint"] == "latency":
        shown = f"{actual:.3f} ms", f"{limit:.3f} ms"
    else:
        shown = f"{actual:.4f}", f"{limit:.4f}"
    met = check.get("status") == "pass"
    if check["constraint"] in ("accuracy", "guard"):
        sign = ("≥" if actual >= limit else "≤") if met else ("<" if actual < limit else ">")
    else:
        sign = "≤" if met else ">"
    by = f" ({check['candidate']})" if check.get("candidate") else ""
    return f"{constraint} {shown[0]} {sign} {shown[1]}{by}"
