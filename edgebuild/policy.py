"""Every constraint a bundle must meet, defined once.

Selection, the mixed-precision search, quantization-aware training, `edgebuild check`, the reports
and junit all judge through here. A constraint is `pass`, `fail`, or `unverified`: this host cannot
measure it (Core ML gives no latency on Linux). An unverified constraint never counts as a pass: the
candidate is not chosen, and the target fails with the reason.
"""
import math
from dataclasses import asdict, dataclass, replace
from typing import Mapping, NamedTuple

from . import devices as device_catalog
from .api import Metric, Status

# The order reports list them in; size to latency are "lower is better"; accuracy and each guard
# follow their metric's direction.
CONSTRAINTS = ("size", "download", "store", "latency", "accuracy", "guard")
BYTE_CONSTRAINTS = ("size", "download", "store")
MEASURED_BY = {"size": "bytes", "download": "download_bytes", "store": "download_bytes", "latency": "latency_ms",
               "accuracy": "metric"}


@dataclass(frozen=True)
class Check:
    """One constraint judged on one candidate: its status, limit and actual value."""

    constraint: str
    status: Status
    limit: float
    actual: float | None
    reason: str = ""           # why it is unverified
    candidate: str = ""        # for a target with no bundle: the candidate that came closest on it
    metric: str = ""           # a guard's metric and output
    output: str = ""

    def to_json(self) -> dict:
        record = {key: value for key, value in asdict(self).items() if value != "" or key == "constraint"}
        record["status"] = self.status.value
        return record

    @classmethod
    def from_json(cls, record: dict) -> "Check":
        return cls(**{**record, "status": Status(record["status"])})

    @property
    def distance(self) -> float:
        """How far the actual value is past the limit, relative to it (0 when met or not measured)."""
        if self.status != Status.FAIL:
            return 0.0
        return abs(self.actual - self.limit) / max(abs(self.limit), 1e-12)


class GuardLimit(NamedTuple):
    """One `accuracy.guards` entry: a floor on a metric (by its key, e.g. 'sqnr[box]') of one output."""

    key: str
    metric: str
    output: str
    floor: float
    higher_is_better: bool


@dataclass(frozen=True)
class Limits:
    """A target's limits: its budgets, the store's hard download limit, the accuracy threshold."""

    size: int | None
    download: int | None
    store: int | None
    latency_ms: float | None
    accuracy: float
    higher_is_better: bool
    guards: tuple[GuardLimit, ...] = ()

    def items(self) -> list[tuple[str, float]]:
        """(constraint, limit) for every constraint this target has but its guards, in report order."""
        limits = {"size": self.size, "download": self.download, "store": self.store, "latency": self.latency_ms,
                  "accuracy": self.accuracy}
        return [(name, limits[name]) for name in CONSTRAINTS if limits.get(name) is not None]

    def higher_is_better_for(self, constraint: str, metric: str = "", output: str = "") -> bool:
        """Whether more is better for a constraint: accuracy and guards follow their metric."""
        if constraint == "accuracy":
            return self.higher_is_better
        if constraint == "guard":
            return next(g.higher_is_better for g in self.guards if (g.metric, g.output) == (metric, output))
        return False

    def met(self, constraint: str, actual: float, limit: float, metric: str = "", output: str = "") -> bool:
        higher = self.higher_is_better_for(constraint, metric, output)
        return actual >= limit if higher else actual <= limit


def store_limit(platform: str, delivery: str | None) -> dict | None:
    """A store's hard download limit; it applies even when the manifest's own budget is larger."""
    store = device_catalog.store_for(platform)
    if store and delivery:
        return {"store": store[0], "delivery": delivery, "limit": store[1][delivery]}
    return None


def accuracy_threshold(target, metric: Metric, baseline: float | None) -> float:
    """The metric a candidate must reach: the floor, or the fp32 baseline less max_drop."""
    return target.threshold(baseline, metric.higher_is_better)


def target_limits(target, metrics: Mapping[str, Metric], gate: str, baseline: float | None,
                  platform: str) -> Limits:
    """A target's limits: `metrics` are the registered ones, `gate` the name of the one that gates."""
    store = store_limit(platform, target.delivery)
    guards = tuple(GuardLimit(guard.spec.key, guard.spec.name, guard.spec.output, guard.floor,
                              metrics[guard.spec.name].higher_is_better) for guard in target.guards)
    return Limits(size=target.size, download=target.download, store=store["limit"] if store else None,
                  latency_ms=target.latency_ms, accuracy=accuracy_threshold(target, metrics[gate], baseline),
                  higher_is_better=metrics[gate].higher_is_better, guards=guards)


def _unmeasured_reason(constraint: str, measured: dict) -> str:
    if measured.get("not_evaluated"):  # over every size budget: never run, so nothing was measured
        return measured["not_evaluated"]
    if constraint == "latency":
        return f"latency not measured: {measured.get('latency_note') or 'the runtime reported no latency'}"
    return f"{constraint} not measured"


def judge(limits: Limits, measured: dict) -> list[Check]:
    """Every constraint of the target, judged on one candidate's measured values."""
    checks = []
    for constraint, limit in limits.items():
        actual = measured.get(MEASURED_BY[constraint])
        if actual is None or (isinstance(actual, float) and math.isnan(actual)):
            checks.append(Check(constraint, Status.UNVERIFIED, limit, None, _unmeasured_reason(constraint, measured)))
        else:
            status = Status.PASS if limits.met(constraint, actual, limit) else Status.FAIL
            checks.append(Check(constraint, status, limit, actual))
    values = measured.get("metrics") or {}
    for guard in limits.guards:
        actual = values.get(guard.key)
        if actual is None:
            checks.append(Check("guard", Status.UNVERIFIED, guard.floor, None, f"{guard.key} not measured",
                                metric=guard.metric, output=guard.output))
            continue
        met = limits.met("guard", actual, guard.floor, guard.metric, guard.output)
        checks.append(Check("guard", Status.PASS if met else Status.FAIL, guard.floor, actual, metric=guard.metric,
                            output=guard.output))
    return checks


def verdict(checks: list[Check]) -> Status:
    """fail if any constraint fails; unverified if any cannot be measured here; else pass."""
    statuses = {check.status for check in checks}
    if Status.FAIL in statuses:
        return Status.FAIL
    return Status.UNVERIFIED if Status.UNVERIFIED in statuses else Status.PASS


def problems(checks: list[Check]) -> list[dict]:
    """The checks that keep a candidate from being chosen, as report.json's `failed` lists them."""
    return [check.to_json() for check in checks if check.status != Status.PASS]


def judged(entry: dict, limits: Limits) -> dict:
    """An evaluated candidate with its status and the constraints that block it."""
    checks = judge(limits, entry)
    return {**entry, "status": verdict(checks).value, "failed": problems(checks)}


def choose(candidates: list[dict], higher_is_better: bool) -> dict | None:
    """The smallest passing candidate; a tie goes to the better metric, then the name."""
    sign = -1 if higher_is_better else 1
    passing = [c for c in candidates if c["status"] == Status.PASS]
    return min(passing, key=lambda c: (c["bytes"], sign * c["metric"], c["technique"]), default=None)


def is_judged(candidate: dict) -> bool:
    """Built and judged (whatever the verdict), as opposed to skipped or failed to build."""
    return candidate["status"] in (Status.PASS, Status.FAIL, Status.UNVERIFIED)


def is_measured(candidate: dict) -> bool:
    """Judged and run in its runtime: it has a metric (one over every size budget is not run)."""
    return is_judged(candidate) and "metric" in candidate


def nearest(candidates: list[dict]) -> dict | None:
    """The judged candidate closest to passing (smallest relative violation summed over what it
    breaks), and by how much each constraint blocks it."""
    judged_ = [c for c in candidates if is_judged(c)]
    if not judged_:
        return None
    closest = min(judged_, key=lambda c: (sum(Check.from_json(f).distance for f in c["failed"]), c["bytes"],
                                          c["technique"]))
    return {"technique": closest["technique"], "blocked_by": [
        {**f, "by": None if f["actual"] is None else abs(f["actual"] - f["limit"])} for f in closest["failed"]]}


def target_checks(limits: Limits, candidates: list[dict], chosen: dict | None) -> list[dict]:
    """Each constraint of a target: judged on the chosen bundle, or, when there is none, on the
    candidate that does best on that constraint alone (so a report says which budgets no candidate
    can meet, and which this host cannot verify)."""
    if chosen is not None:
        return [check.to_json() for check in judge(limits, chosen)]
    # Candidates run in their runtime first: on a tie (latency unverified on every one) the reason
    # shown is the runtime's, not "not evaluated: over budget".
    judged_ = sorted((c for c in candidates if is_judged(c)), key=lambda c: not is_measured(c))
    every = [(check, c["technique"]) for c in judged_ for check in judge(limits, c)]
    identities = list(dict.fromkeys((check.constraint, check.metric, check.output) for check, _ in every))
    if not every:
        return [Check(constraint, Status.FAIL, limit, None, "no candidate was evaluated").to_json()
                for constraint, limit in limits.items()]
    rank = {Status.PASS: 0, Status.FAIL: 1, Status.UNVERIFIED: 2}
    rows = []
    for identity in identities:
        checks = [(check, technique) for check, technique in every
                  if (check.constraint, check.metric, check.output) == identity]
        sign = -1 if limits.higher_is_better_for(*identity) else 1
        best, technique = min(checks, key=lambda item: (rank[item[0].status],
                                                        sign * (item[0].actual if item[0].actual is not None else 0)))
        rows.append(replace(best, candidate=technique).to_json())
    return rows


def pareto_front(points: list[dict], higher_is_better: bool) -> list[dict]:
    """Points no other point beats on both bytes (smaller) and metric."""
    sign = 1 if higher_is_better else -1
    front, best = [], -math.inf
    for point in sorted(points, key=lambda p: (p["bytes"], -sign * p["metric"])):
        if sign * point["metric"] > best:
            front.append(point)
            best = sign * point["metric"]
    return front
