"""junit.xml: one test case per target x constraint, so any CI dashboard shows budget breaches."""
from pathlib import Path
from xml.etree import ElementTree

from edgebuild.fsutil import atomic_write_bytes
from edgebuild.reasons import constraint_label

def _constraint_case(target: dict, check: dict) -> ElementTree.Element:
    """One test case for one constraint, as policy.py judged it (report.json's target `constraints`)."""
    label = constraint_label(check)
    case = ElementTree.Element("testcase", classname=f"edgebuild.{target['name']}", name=label)
    properties = ElementTree.SubElement(case, "properties")
    for name in ("limit", "actual", "status"):
        ElementTree.SubElement(properties, "property", name=name, value=repr(check[name]) if name != "status"
                               else check["status"])
    if target["chosen"] is not None:
        case.set("file", target["chosen"]["path"])
    status = check.get("status", "fail")
    if status == "unverified":  # a constraint this host cannot measure is never reported as passed
        ElementTree.SubElement(case, "failure", type=f"{check['constraint']}-unverified",
                               message=f"{label} unverified: {check.get('reason', '')}")
    elif status == "fail":
        best = check.get("candidate") or "no candidate"
        failure = ElementTree.SubElement(case, "failure", type=f"{check['constraint']}-budget",
                                         message=f"{label}: limit {check['limit']}, "
                                                 f"best actual {check['actual']} ({best})")
        failure.text = "\n".join(f"{c['technique']}: {label} {f['actual']} vs limit {f['limit']}"
                                 for c in target["candidates"] for f in c.get("failed", [])
                                 if constraint_label(f) == label)
    return case


def junit_tree(report: dict) -> ElementTree.ElementTree:
    suites = ElementTree.Element("testsuites", name=f"edgebuild {report['model']['name']}")
    for target in report["targets"]:
        cases = [_constraint_case(target, check) for check in target["constraints"]]
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
        properties = ElementTree.SubElement(suite, "properties")
        if target.get("built_at"):  # a --target/--platform build keeps the others from their last build
            ElementTree.SubElement(properties, "property", name="built_at", value=target["built_at"])
            ElementTree.SubElement(properties, "property", name="in_this_build",
                                   value="true" if target.get("in_this_build", True) else "false")
        for copy in target.get("stored_twice", []):  # waste, not a budget breach: shown, not failed
            ElementTree.SubElement(properties, "property", name="stored_twice", value=copy["text"])
        if not len(properties):
            suite.remove(properties)
        suite.extend(cases)
    ElementTree.indent(suites)
    return ElementTree.ElementTree(suites)


def write_junit(report: dict, output: Path) -> Path:
    path = output / "junit.xml"
    tree = junit_tree(report)
    atomic_write_bytes(path, ElementTree.tostring(tree.getroot(), encoding="utf-8", xml_declaration=True) + b"\n")
    return path
