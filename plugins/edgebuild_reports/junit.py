"""junit.xml: one test case per target x constraint, so any CI dashboard shows budget breaches."""
from pathlib import Path
from xml.etree import ElementTree

from edgebuild.fsutil import atomic_write_bytes

LOWER_IS_BETTER = ("size", "download", "store", "latency")


def _limits(target: dict) -> dict[str, float]:
    limits = {}
    if target["budget"]["size"] is not None:
        limits["size"] = target["budget"]["size"]
    if target["budget"]["download"] is not None:
        limits["download"] = target["budget"]["download"]
    if target.get("store"):
        limits["store"] = target["store"]["limit"]
    if target["budget"].get("latency_ms") is not None:
        limits["latency"] = target["budget"]["latency_ms"]
    limits["accuracy"] = target["accuracy"]["threshold"]
    return limits


def _value(candidate: dict, constraint: str) -> float | None:
    """The candidate's figure for a constraint (latency is None where it is not measured)."""
    return {"size": candidate["bytes"], "download": candidate["download_bytes"], "store": candidate["download_bytes"],
            "latency": candidate.get("latency_ms")}.get(constraint, candidate["metric"])


def junit_tree(report: dict) -> ElementTree.ElementTree:
    higher_is_better = report["metric"]["higher_is_better"]
    suites = ElementTree.Element("testsuites", name=f"edgebuild {report['model']['name']}")
    for target in report["targets"]:
        judged = [c for c in target["candidates"] if c["status"] in ("pass", "fail")]
        cases = []
        for constraint, limit in _limits(target).items():
            case = ElementTree.Element("testcase", classname=f"edgebuild.{target['name']}", name=constraint)
            chosen = target["chosen"]
            if chosen is not None:
                case.set("file", chosen["path"])
                properties = ElementTree.SubElement(case, "properties")
                ElementTree.SubElement(properties, "property", name="limit", value=repr(limit))
                ElementTree.SubElement(properties, "property", name="actual", value=repr(_value(chosen, constraint)))
            else:
                # No bundle: the constraint fails when no candidate meets it on its own.
                measured = [c for c in judged if _value(c, constraint) is not None]
                if constraint in LOWER_IS_BETTER:
                    best = min(measured, key=lambda c: _value(c, constraint), default=None)
                    met = best is not None and _value(best, constraint) <= limit
                else:
                    best = max(measured, key=lambda c: _value(c, constraint) * (1 if higher_is_better else -1), default=None)
                    met = best is not None and (_value(best, constraint) >= limit if higher_is_better
                                                else _value(best, constraint) <= limit)
                if not met:
                    actual = _value(best, constraint) if best else None
                    best_name = best["technique"] if best else "no candidate"
                    failure = ElementTree.SubElement(case, "failure", type=f"{constraint}-budget",
                                                     message=f"{constraint}: limit {limit}, best actual {actual} ({best_name})")
                    failure.text = "\n".join(
                        f"{c['technique']}: {constraint} {_value(c, constraint)} vs limit {limit}" for c in measured)
            cases.append(case)
        if target["chosen"] is None:
            combined = ElementTree.Element("testcase", classname=f"edgebuild.{target['name']}", name="all constraints")
            ElementTree.SubElement(combined, "failure", type="no-candidate",
                                   message="no candidate meets every budget and the floor at once")
            cases.append(combined)
        for candidate in target["candidates"]:
            if candidate["status"] == "error":
                case = ElementTree.Element("testcase", classname=f"edgebuild.{target['name']}",
                                           name=f"toolchain {candidate['technique']}")
                ElementTree.SubElement(case, "error", type=candidate["error"]["stage"], message=candidate["error"]["message"])
                cases.append(case)
        suite = ElementTree.SubElement(suites, "testsuite", name=f"edgebuild.{target['name']}", tests=str(len(cases)),
                                       failures=str(sum(1 for c in cases if c.find("failure") is not None)),
                                       errors=str(sum(1 for c in cases if c.find("error") is not None)), skipped="0")
        suite.extend(cases)
    ElementTree.indent(suites)
    return ElementTree.ElementTree(suites)


def write_junit(report: dict, output: Path) -> Path:
    path = output / "junit.xml"
    tree = junit_tree(report)
    atomic_write_bytes(path, ElementTree.tostring(tree.getroot(), encoding="utf-8", xml_declaration=True) + b"\n")
    return path
