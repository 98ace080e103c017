"""`edgebuild` command line. Exit codes: 0 pass, 1 budget/floor not met, 2 bad input, 3 toolchain failure."""
import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from rich.console import Console

from . import __version__
from .errors import EXIT_BUDGET, EXIT_INPUT, EXIT_OK, EXIT_TOOLCHAIN, EdgebuildError, InputError
from .reasons import candidate_reason, check_text
from .units import format_size

DEFAULT_MANIFEST = "edgebuild.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgebuild", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgebuild {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser("build", help="build, evaluate and package every target's bundle")
    build.add_argument("-f", "--file", default=DEFAULT_MANIFEST, help="manifest (default: edgebuild.yaml)")
    build.add_argument("--target", action="append", default=[], metavar="NAME", help="build only this target (repeatable)")
    build.add_argument("--json", action="store_true", help="print the report summary as JSON on stdout")
    build.add_argument("--platform", action="append", default=[], metavar="NAME",
                       help="build only targets for this platform, e.g. android (repeatable)")
    build.add_argument("--report", action="append", default=[], metavar="FORMAT",
                       help="report formats to write (json, md, junit, html; repeatable; default: the manifest's)")
    build.add_argument("--no-wait", action="store_true", help="fail instead of waiting when another build holds the project")
    build.add_argument("--evaluate-all", action="store_true",
                       help="evaluate candidates over every size budget too (by default they are reported, not run)")
    build.add_argument("--jobs", metavar="N", help="cores to use: stages run at once and shards of the evaluation "
                                                   "data (default: EDGEBUILD_JOBS, else every core); results do "
                                                   "not depend on it")
    build.add_argument("--cache", metavar="DIR|URL",
                       help="a cache of stage outputs shared with other clones and machines: a folder or an "
                            "fsspec URL such as s3://bucket/edgebuild (default: EDGEBUILD_CACHE, else the "
                            "manifest's `cache:`)")
    build.add_argument("--executor", choices=["local", "ray"], default=None,
                       help="where heavy stages run: this machine (default: EDGEBUILD_EXECUTOR, else local) "
                            "or Ray tasks on a cluster (pip install 'edgebuild[ray]')")
    build.add_argument("--ray-address", metavar="ADDR", default=None,
                       help="the Ray cluster to use (default: EDGEBUILD_RAY_ADDRESS, else a local one started "
                            "for the build)")

    validate = commands.add_parser("validate", help="check the manifest and exit")
    validate.add_argument("-f", "--file", default=DEFAULT_MANIFEST, help="manifest (default: edgebuild.yaml)")

    check = commands.add_parser("check", help="verify built bundles against edgebuild.lock and the budgets; builds nothing")
    check.add_argument("-f", "--file", default=DEFAULT_MANIFEST, help="manifest (default: edgebuild.yaml)")
    check.add_argument("--target", action="append", default=[], metavar="NAME", help="only this target (repeatable)")

    report = commands.add_parser("report", help="compare the last build's report with a baseline report")
    report.add_argument("-f", "--file", default=DEFAULT_MANIFEST, help="manifest (default: edgebuild.yaml)")
    report.add_argument("--baseline", required=True, metavar="OLD_REPORT.json", help="report.json from main")
    report.add_argument("--fail-on-growth", metavar="PERCENT", help="exit 1 when bytes or download bytes grow more")
    report.add_argument("--report", action="append", default=[], metavar="FORMAT", help="formats to rewrite with deltas")

    inputs = commands.add_parser("inputs", help="print the files a build reads and where bundles go (for build tools)")
    inputs.add_argument("-f", "--file", default=DEFAULT_MANIFEST, help="manifest (default: edgebuild.yaml)")
    inputs.add_argument("--target", action="append", default=[], metavar="NAME", help="only this target (repeatable)")
    inputs.add_argument("--platform", action="append", default=[], metavar="NAME", help="only this platform's targets")

    init = commands.add_parser("init", help="write build-tool integration into an app repository")
    init.add_argument("platform", choices=["android"], help="which integration to write")
    init.add_argument("--app-dir", default=".", help="the app module's folder (default: current folder)")
    init.add_argument("-f", "--file", default=DEFAULT_MANIFEST, help="the manifest the app builds from")
    init.add_argument("--force", action="store_true", help="overwrite a locally modified edgebuild.gradle")

    plugins = commands.add_parser("plugins", help="list loaded plugins and what each registers")
    plugins.add_argument("-f", "--file", default=None,
                         help="also load this manifest's project-local plugins (its `plugins:` files)")
    plugins.add_argument("--json", action="store_true", help="print as JSON")
    return parser


def _load(path: str, only_targets: list[str] | None = None, platforms: list[str] | None = None):
    from .manifest import load_project

    manifest, registry = load_project(path)
    names = [t.name for t in manifest.targets]
    for name in only_targets or []:
        if name not in names:
            raise InputError(f"unknown target {name!r} (targets: {', '.join(names)})", field="--target")
    known_platforms = sorted({b.platform for b in registry.backends.values()})
    for platform in platforms or []:
        if platform not in known_platforms:
            raise InputError(f"unknown platform {platform!r} (platforms: {', '.join(known_platforms)})", field="--platform")
    manifest.targets = [t for t in manifest.targets
                        if (not only_targets or t.name in only_targets)
                        and (not platforms or registry.backends[t.format].platform in platforms)]
    if not manifest.targets:
        raise InputError("no target of the manifest matches the --target/--platform selection", file=str(path))
    return manifest, registry


def cmd_validate(args, console: Console) -> int:
    manifest, _ = _load(args.file)
    names = ", ".join(t.name for t in manifest.targets)
    console.print(f"{args.file}: valid ({len(manifest.targets)} target{'s' if len(manifest.targets) != 1 else ''}: {names})",
                  highlight=False)
    return EXIT_OK


def cmd_plugins(args, console: Console) -> int:
    from .plugins import default_registry

    registry = _load(args.file)[1] if args.file else default_registry()
    rows = []
    for plugin in registry.plugins:
        provides = sorted(f"{kind} {name}" + (f" (replaces {registry.replaced[(kind, name)]}'s)"
                                              if (kind, name) in registry.replaced else "")
                          for (kind, name), origin in registry.origin.items() if origin == plugin["name"])
        rows.append({**plugin, "provides": provides})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        print(f"{row['name']}  ({row['module']} from {row['distribution'] or 'no distribution'})")
        print(f"    {row['file']}")
        for item in row["provides"]:
            print(f"    - {item}")
    return EXIT_OK


def _set_jobs(value: str | None) -> None:
    """`--jobs N` (else EDGEBUILD_JOBS), checked here so a stage never meets a bad value; stages and
    the processes they start read it from the environment."""
    from .pipeline.evaluation import JOBS_VARIABLE

    source, value = ("--jobs", value) if value is not None else (JOBS_VARIABLE, os.environ.get(JOBS_VARIABLE))
    if value is None:
        return
    os.environ[JOBS_VARIABLE] = str(_whole_number(value, source))


def _check_memory() -> None:
    """EDGEBUILD_MEMORY, the bytes the stages that run at once may reserve: checked like --jobs."""
    from .pipeline.machine import MEMORY_VARIABLE

    value = os.environ.get(MEMORY_VARIABLE)
    if value is not None:
        _whole_number(value, MEMORY_VARIABLE)


def _whole_number(value: str, source: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise InputError(f"expected a whole number of at least 1, got {value!r}", file=source)
    return int(value)


def cmd_build(args, console: Console) -> int:
    from .pipeline.layout import Build
    from .pipeline.runner import read_targets, run_pipeline

    _set_jobs(args.jobs)
    _check_memory()
    from .pipeline.layout import EXECUTOR_VARIABLE, RAY_ADDRESS_VARIABLE, executor_name

    if args.executor is not None:
        os.environ[EXECUTOR_VARIABLE] = args.executor
    if args.ray_address is not None:
        os.environ[RAY_ADDRESS_VARIABLE] = args.ray_address
    executor_name()  # a bad EDGEBUILD_EXECUTOR is exit 2 here
    if args.cache is not None:  # through the environment, so worker and isolated stage processes see it
        from .pipeline.cache import CACHE_VARIABLE

        if not args.cache.strip():
            raise InputError("expected a folder or a URL, got ''", file="--cache")
        os.environ[CACHE_VARIABLE] = str(Path(args.cache).resolve()) if "://" not in args.cache else args.cache
    if args.evaluate_all:  # through the environment, so isolated stage processes see it too
        from .pipeline.layout import EVALUATE_ALL_VARIABLE

        os.environ[EVALUATE_ALL_VARIABLE] = "1"
    manifest, registry = _load(args.file, args.target, args.platform)
    if args.report:
        manifest.reports = _report_formats(args.report, registry)
    build = Build(manifest, registry)
    if build.shared_cache is not None:  # an unusable cache fails here, once, not in every stage
        build.shared_cache.check()
    result = run_pipeline(build, console=console, wait=not args.no_wait)
    _print_stages(result, console)
    targets = read_targets(build)
    candidate_errors = [(t["name"], c) for t in targets for c in t["candidates"] if c["status"] == "error"]
    _print_targets(targets, candidate_errors, manifest.metric, console)
    for warning in _warnings(build):
        _say(console, f"warning: {warning}", "yellow")
    report = manifest.output / "report.json"
    if report.is_file() and not result.errors:
        _say(console, f"report: {manifest.relative(report)}")

    if any(e.exit_code == EXIT_INPUT for e in result.errors):
        code = EXIT_INPUT
    elif result.errors or candidate_errors:
        code = EXIT_TOOLCHAIN
    elif any(t["status"] != "pass" for t in targets) or len(targets) < len(manifest.targets):
        code = EXIT_BUDGET
    else:
        code = EXIT_OK
    # Stages that fail on the same input (each conversion checks the labels) say so once.
    for line in dict.fromkeys(str(error) for error in result.errors):
        print(line, file=sys.stderr)
    if code == EXIT_BUDGET:
        # The last stderr line is the one-line reason that CI and the Gradle hook show.
        for target in targets:
            if target["status"] != "pass":
                print(f"{manifest.path.name}: target {target['name']}: no candidate meets every budget and the floor; "
                      f"nearest: {_nearest(target)}; report: {manifest.relative(manifest.output / 'report.md')}",
                      file=sys.stderr)
    if args.json:
        print(json.dumps({
            "exit_code": code,
            "report": manifest.relative(report) if report.is_file() else None,
            "executed": result.executed,
            "cached": result.cached,
            "failed": result.failed,
            "not_run": result.blocked,
            "up_to_date": len(result.up_to_date),
            "errors": [str(e) for e in result.errors],
            "targets": [{"name": t["name"], "status": t["status"], "chosen": t["chosen"],
                         "files": _packaged_files(build, t["name"])} for t in targets],
        }, indent=2))
    return code


def _say(console: Console, text: str, style: str | None = None) -> None:
    """One line on stderr. `text` holds names from the manifest and models ('top1[face]'): never
    read as rich markup."""
    console.print(text, style=style, markup=False, highlight=False)


def _print_stages(result, console: Console) -> None:
    """What ran: stages executed, up to date, failed, not run."""
    if not (result.executed or result.failed or result.cached):
        console.print(f"nothing changed: all {len(result.up_to_date)} stages up to date; "
                      "no conversion or evaluation rerun", highlight=False)
        return
    heavy = [s for s in result.executed if s.split(":")[0] in ("export", "convert", "compress", "evaluate")]
    failed = f", {len(result.failed)} failed ({', '.join(result.failed)})" if result.failed else ""
    if result.blocked:
        failed += f", {len(result.blocked)} not run because of that"
    cached = f", {len(result.cached)} from the shared cache" if result.cached else ""
    console.print(f"ran {len(result.executed)} stage(s){cached}, {len(result.up_to_date)} up to date{failed}"
                  f"{'' if heavy else ' (no conversion or evaluation rerun)'}", highlight=False)


def _print_targets(targets: list[dict], candidate_errors: list, metric: str, console: Console) -> None:
    """Per target, the chosen bundle, or why every candidate was not chosen; then toolchain errors."""
    for target in targets:
        chosen = target["chosen"]
        if chosen:
            budget = f" (budget {format_size(target['budget']['size'])})" if target["budget"]["size"] else ""
            _say(console, f"✔ {target['name']}: {chosen['technique']} {format_size(chosen['bytes'])}{budget}, "
                          f"{metric} {chosen['metric']:.4f} (floor {target['accuracy']['threshold']:.4f}) "
                          f"→ {chosen['path']}", "green")
            continue
        _say(console, f"✘ {target['name']}: no candidate meets every budget and the floor", "red")
        for check in target["constraints"]:
            if check["status"] == "unverified":
                _say(console, f"    {check_text(check)}")
        for candidate in target["candidates"]:
            _say(console, f"    {candidate['technique']}: {candidate_reason(candidate, exact=True)}")
    for target_name, candidate in candidate_errors:
        error = candidate["error"]
        _say(console, f"error stage {error['stage']}, target {target_name}, technique {candidate['technique']}: "
                      f"{error['message']}", "red")


def _warnings(build) -> list[str]:
    """What the fp32 baseline made suspicious (a label metric at chance: the wrong output or labels)."""
    from .fsutil import read_json

    try:
        return read_json(build.baseline).get("warnings", [])
    except (OSError, ValueError):
        return []


def _packaged_files(build, target_name: str) -> list[str]:
    from .fsutil import read_json

    target = next(t for t in build.manifest.targets if t.name == target_name)
    try:
        return [entry["path"] for entry in read_json(build.packaged(target))["files"]]
    except (OSError, ValueError, KeyError):
        return []


def _nearest(target: dict) -> str:
    """The failing candidate closest to passing, as select() chose it."""
    nearest = target.get("nearest")
    if not nearest:
        return "none built"
    candidate = next(c for c in target["candidates"] if c["technique"] == nearest["technique"])
    return f"{nearest['technique']} ({candidate_reason(candidate, exact=True)})"


def _report_formats(names: list[str], registry) -> list[str]:
    for name in names:
        if name not in registry.reporters:
            raise InputError(f"unknown report format {name!r} (available: {', '.join(sorted(registry.reporters))})",
                             field="--report")
    return ["json"] + [n for n in dict.fromkeys(names) if n != "json"]


def cmd_check(args, console: Console) -> int:
    from .gates import check_bundles
    from .pipeline.layout import Build

    manifest, registry = _load(args.file, args.target)
    result = check_bundles(Build(manifest, registry))
    for line in result.ok:
        _say(console, f"✔ {line}", "green")
    for line in result.problems:
        print(line, file=sys.stderr)
    return EXIT_BUDGET if result.problems else EXIT_OK


def cmd_report(args, console: Console) -> int:
    from .gates import compare_reports, growth_violations, load_report, parse_percent
    from .pipeline.layout import Build
    from .pipeline.stages.deliver import write_reports

    limit = parse_percent(args.fail_on_growth) if args.fail_on_growth is not None else None
    manifest, registry = _load(args.file)
    current_path = manifest.output / "report.json"
    current = load_report(current_path, manifest.relative(current_path))
    baseline = load_report(Path(args.baseline), args.baseline)
    current["baseline_report"] = compare_reports(current, baseline, args.baseline)
    formats = _report_formats(args.report, registry) if args.report else manifest.reports
    write_reports(Build(manifest, registry), formats, data=current)
    print("target\tbytes\tdownload\tmetric")
    for row in current["baseline_report"]["targets"]:
        cells = [_delta_text(row[key]) for key in ("bytes", "download_bytes", "metric")]
        print("\t".join([row["name"], *cells]))
    if limit is None:
        return EXIT_OK
    problems = growth_violations(current["baseline_report"], limit)
    for line in problems:
        print(line, file=sys.stderr)
    return EXIT_BUDGET if problems else EXIT_OK


def _delta_text(delta: dict) -> str:
    if delta["delta"] is None:
        return f"{delta['old']} → {delta['new']}"
    percent = f" ({delta['percent']:+.1f}%)" if delta["percent"] is not None else ""
    number = f"{delta['delta']:+.4f}" if isinstance(delta["delta"], float) else f"{delta['delta']:+d}"
    return f"{number}{percent}"


def cmd_inputs(args, console: Console) -> int:
    """Files a build reads and where its bundles land: what a build tool needs for up-to-date checks."""
    from .pipeline.layout import Build

    manifest, registry = _load(args.file, args.target, args.platform)
    build = Build(manifest, registry)
    print(json.dumps({
        "manifest": str(manifest.path),
        "inputs": [str(p) for p in build.input_files()],
        "output": str(manifest.output),
        "targets": [{"name": t.name, "format": t.format, "platform": registry.backends[t.format].platform,
                     "directory": str(build.target_output(t)),
                     "assets_dir": t.android.get("assets_dir")}
                    for t in manifest.targets],
    }, indent=2))
    return EXIT_OK


def cmd_init(args, console: Console) -> int:
    from .integrations import init_android

    return init_android(Path(args.app_dir), Path(args.file), force=args.force, console=console)


COMMANDS = {"build": cmd_build, "validate": cmd_validate, "check": cmd_check, "report": cmd_report,
            "inputs": cmd_inputs, "init": cmd_init, "plugins": cmd_plugins}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    try:
        return COMMANDS[args.command](args, console)
    except EdgebuildError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgebuild: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a bare traceback in CI logs; EDGEBUILD_DEBUG=1 shows it
        if os.environ.get("EDGEBUILD_DEBUG"):
            traceback.print_exc()
        print(f"edgebuild: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_TOOLCHAIN


if __name__ == "__main__":
    sys.exit(main())
