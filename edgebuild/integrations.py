"""`edgebuild init`: writes build-tool integration files into an app repository."""
import os
from importlib import resources
from pathlib import Path

from rich.console import Console

from .errors import EXIT_OK, InputError
from .fsutil import atomic_write_text

SNIPPET = """\
// build.gradle (Groovy DSL) of the app module:
apply from: 'edgebuild.gradle'
edgebuildSettings {{
    manifest = '{manifest}'
}}

// build.gradle.kts (Kotlin DSL): apply the same file, set the manifest in gradle.properties:
//   apply(from = "edgebuild.gradle")
//   gradle.properties: edgebuild.manifest={manifest}
"""


def gradle_script() -> str:
    return resources.files("edgebuild_templates").joinpath("android", "edgebuild.gradle").read_text(encoding="utf-8")


def init_android(app_dir: Path, manifest: Path, *, force: bool, console: Console) -> int:
    """Write `edgebuild.gradle` into the app module and print the lines to paste. Idempotent."""
    if not app_dir.is_dir():
        raise InputError(f"app folder {app_dir} does not exist", field="--app-dir")
    script = app_dir / "edgebuild.gradle"
    wanted = gradle_script()
    if script.exists() and script.read_text(encoding="utf-8") != wanted and not force:
        raise InputError(f"{script} exists and differs from this edgebuild's version; rerun with --force to replace it",
                         field="init android")
    if script.exists() and script.read_text(encoding="utf-8") == wanted:
        console.print(f"{script}: already up to date", highlight=False)
    else:
        atomic_write_text(script, wanted)
        console.print(f"wrote {script}", highlight=False)
    relative_manifest = Path(os.path.relpath(manifest.resolve(), app_dir.resolve())).as_posix()
    print(SNIPPET.format(manifest=relative_manifest), end="")
    return EXIT_OK
