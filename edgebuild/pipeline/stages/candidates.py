"""Convert, compress, evaluate: the fp32 bundle per variant, one candidate per technique, and each
candidate run in its runtime on the evaluation set."""
from ...api import CandidateRecord, CompressInput, NotApplicable, Status
from ...errors import EdgebuildError, ToolchainError, first_line
from ...fsutil import (atomic_output, atomic_write_json, bundle_bytes, bundle_download_bytes, bundle_sha256, read_json,
                       record_matches, remove_path, replace_path)
from ...manifest import check_interface
from ..evaluation import NotDeterministic, evaluate_bundle, evaluated_before, read_data
from ..layout import Build

CALIBRATION_SAMPLES = 256  # enough for min/max ranges; more only slows the quantizer


def convert(build: Build, variant_key: str) -> None:
    # Labels and image inputs must fit the exported model before any bundle carries them.
    meta = read_json(build.model_meta)
    check_interface(build.manifest, meta["inputs"], meta["outputs"])
    variant = build.variants[variant_key]
    backend = build.registry.backends[variant.backend]
    out = build.fp32_bundle(variant_key)
    temporary = atomic_output(out)
    targets = ", ".join(t.name for t in build.manifest.targets if build.variant(t).key == variant_key)
    try:
        backend.convert(build.exported_program, temporary, variant.options)
        replace_path(temporary, out)
    except ToolchainError as exc:
        raise ToolchainError(exc.reason, stage=exc.stage, target=targets, op=exc.op) from exc
    except Exception as exc:
        raise ToolchainError(f"{variant.backend} conversion failed: {first_line(exc)}", stage="convert",
                             target=targets) from exc
    finally:
        remove_path(temporary)
    # Bundles may be folders (.mlpackage); doit tracks this record of their hash instead.
    atomic_write_json(build.fp32_record(variant_key), {"sha256": bundle_sha256(out)})


def compress(build: Build, variant_key: str, technique_name: str) -> None:
    """Build one candidate; a toolchain failure is recorded (and retried next build), not fatal."""
    variant = build.variants[variant_key]
    backend = build.registry.backends[variant.backend]
    technique = build.registry.techniques[(variant.backend, technique_name)]
    out = build.candidate_bundle(variant_key, technique_name)
    calibration = None
    if technique.needs_calibration:
        calibration = read_data(build, "calibration", need_labels=False).samples(CALIBRATION_SAMPLES)
    temporary = atomic_output(out)
    try:
        backend.compress(technique, CompressInput(fp32_bundle=build.fp32_bundle(variant_key),
                                                  exported_program=build.exported_program,
                                                  calibration=calibration, work_dir=out.parent,
                                                  options=variant.options), temporary)
        replace_path(temporary, out)
        record = CandidateRecord(technique_name, Status.OK, sha256=bundle_sha256(out))
    except NotApplicable as exc:
        record = CandidateRecord(technique_name, Status.SKIPPED, reason=str(exc))
        remove_path(out)
    except Exception as exc:
        error = exc if isinstance(exc, ToolchainError) else ToolchainError(
            first_line(exc), stage="compress", technique=technique_name)
        record = CandidateRecord(technique_name, Status.ERROR, error=error.to_record())
        remove_path(out)
    finally:
        remove_path(temporary)
    atomic_write_json(build.candidate_record(variant_key, technique_name), record.to_json())


def candidate_is_valid(build: Build, variant_key: str, technique_name: str) -> bool:
    try:
        if CandidateRecord.from_json(read_json(build.candidate_record(variant_key, technique_name))).status \
                == Status.SKIPPED:
            return True  # nothing to build for this model; settled until its inputs change
    except (OSError, ValueError, KeyError):
        return False
    return record_matches(build.candidate_record(variant_key, technique_name),
                          build.candidate_bundle(variant_key, technique_name))


def candidate_is_shareable(build: Build, variant_key: str, technique_name: str) -> bool:
    """A built or not-applicable candidate goes to the shared cache; a failed one is retried instead."""
    try:
        status = CandidateRecord.from_json(read_json(build.candidate_record(variant_key, technique_name))).status
    except (OSError, ValueError, KeyError):
        return False
    return status in (Status.OK, Status.SKIPPED)


def evaluation_is_shareable(build: Build, variant_key: str, technique_name: str) -> bool:
    """An evaluation (or a skipped one) goes to the shared cache; one that failed is retried instead.
    One left out as over budget is shared too, and used only where it is still over every budget
    (`evaluation_is_current`): budgets are not in the key."""
    try:
        record = read_json(build.evaluation(variant_key, technique_name))
    except (OSError, ValueError):
        return False
    return record.get("status") in ("ok", "skipped")


def evaluation_is_current(build: Build, variant_key: str, technique_name: str) -> bool:
    """An evaluation left out for being over budget is stale once a budget grows past the candidate
    (or `--evaluate-all` asks for it); a full evaluation stays valid whatever the budgets."""
    try:
        record = read_json(build.evaluation(variant_key, technique_name))
    except (OSError, ValueError):
        return False
    if "not_evaluated" not in record:
        return True
    limit = build.evaluation_size_limit(variant_key)
    return limit is not None and record["bytes"] > limit


def evaluate(build: Build, variant_key: str, technique_name: str) -> None:
    """Run the candidate in its runtime on the evaluation set; record metric, size and latency."""
    variant = build.variants[variant_key]
    backend = build.registry.backends[variant.backend]
    technique = build.registry.techniques[(variant.backend, technique_name)]
    record = CandidateRecord.from_json(read_json(build.candidate_record(variant_key, technique_name)))
    result = {"technique": technique_name, "description": technique.description}
    destination = build.evaluation(variant_key, technique_name)
    if record.status == Status.SKIPPED:
        atomic_write_json(destination, {**result, "status": "skipped", "reason": record.reason})
        return
    if record.status != Status.OK:
        atomic_write_json(destination, {**result, "status": "error", "error": record.error})
        return
    bundle = build.candidate_bundle(variant_key, technique_name)
    limit, size = build.evaluation_size_limit(variant_key), bundle_bytes(bundle)
    if limit is not None and size > limit:  # no target can ship it, whatever its accuracy
        atomic_write_json(destination, {**result, "status": "ok", "sha256": record.sha256,
                                        "bytes": size, "download_bytes": bundle_download_bytes(bundle),
                                        "not_evaluated": f"not evaluated: over budget ({size:,} B > "
                                                         f"{limit:,} B, the largest size budget of its targets; "
                                                         f"--evaluate-all evaluates it)"})
        return
    before = evaluated_before(build, variant_key, record.sha256)
    try:
        measured = read_json(before) if before.is_file() else evaluate_bundle(build, backend, bundle)
    except EdgebuildError:
        raise
    except Exception as exc:  # the runtime failed on this candidate, or its outputs do not repeat
        message = str(exc) if isinstance(exc, NotDeterministic) else first_line(exc)
        error = ToolchainError(message, stage="evaluate", technique=technique_name)
        atomic_write_json(destination, {**result, "status": "error", "error": error.to_record()})
        return
    if not before.is_file():
        before.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(before, measured)
    atomic_write_json(destination, {**result, "status": "ok", "sha256": record.sha256, **measured})
