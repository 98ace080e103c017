"""A content-addressed cache of stage outputs, shared by clones and machines (issue #18).

A stage's key is what decides its output: the stage's name, its settings and the code that runs it
(the same key doit's `config_changed` checks), and the content of every file it reads, by path
relative to the project. None of it depends on where the project sits, so a clone at another path,
on another CI runner, finds the outputs a first build stored and runs nothing it already ran.

Layout, under any fsspec URL (a folder, NFS, s3://, gs://):
    blobs/<sha256[:2]>/<sha256>   file contents, named by their hash
    entries/<key>.json            one stage's outputs: relative path -> sha256, bytes

Writes are atomic: a blob or an entry is written under a temporary name and renamed (an object
store's put is atomic by itself), and an entry is written only after all its blobs, so no reader
sees half an artifact. Two writers of one key write the same bytes. A blob whose content does not
match its name (a corrupt or truncated entry) is a miss: the stage runs and stores it again.
"""
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..fsutil import bundle_files, content_sha256, remove_path, replace_path, sha256_file

CACHE_VARIABLE = "EDGEBUILD_CACHE"
FROM_CACHE = "from the shared cache"  # what a stage returns when its outputs were fetched


@dataclass(frozen=True)
class Shared:
    """What of a stage the shared cache holds: every file it writes that later stages read, and
    whether a run's outputs may be shared (a failure is retried, not shared)."""

    outputs: tuple[Path, ...]
    keep: Callable | None = None    # (build, *stage args) -> whether to store what the stage wrote
    usable: Callable | None = None  # (build, *stage args) -> whether what was fetched serves this build


def sharing(task_name: str, stage: Callable, settings: dict, inputs: list[str], shared: Shared) -> Callable:
    """`stage`, fetching its outputs from the build's shared cache when they are there, storing
    them when it ran. `inputs`: the stage's file_dep, relative to the project."""
    def run(build, *args):
        cache = build.shared_cache
        if cache is None:
            return stage(build, *args)
        root = build.manifest.root
        key = stage_key(task_name, settings, [(relative, root / relative) for relative in inputs])
        outputs = [(Path(os.path.relpath(path, root)).as_posix(), path) for path in shared.outputs]
        if cache.fetch(key, outputs) and (shared.usable is None or shared.usable(build, *args)):
            return FROM_CACHE
        returned = stage(build, *args)
        if shared.keep is None or shared.keep(build, *args):
            cache.store(key, outputs)
        return returned

    return run


def stage_key(task_name: str, settings: dict, inputs: list[tuple[str, Path]]) -> str:
    """The cache key of one stage: its name, settings (code included) and inputs' content by
    project-relative path."""
    described = {"stage": task_name, "settings": settings,
                 "inputs": [[relative, content_sha256(path)] for relative, path in sorted(inputs)]}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _files(path: Path, relative: str) -> list[tuple[str, Path]]:
    """(relative name, path) of a file, or of every file under a folder (a .mlpackage)."""
    if not path.exists():
        return []
    return [(relative if file == path else f"{relative}/{file.relative_to(path).as_posix()}", file)
            for file in bundle_files(path)]


class SharedCache:
    """Stage outputs stored and fetched through fsspec; see the module's docstring."""

    def __init__(self, url: str):
        import fsspec

        self.url = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing
            raise InputError(f"cannot open the cache {url!r}: {exc}", field="cache") from None
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def check(self) -> None:
        """Fail with one line when the cache cannot be reached or written."""
        try:
            self.fs.makedirs(f"{self.root}/entries", exist_ok=True)
            self.fs.makedirs(f"{self.root}/blobs", exist_ok=True)
        except Exception as exc:
            raise InputError(f"cannot use the cache {self.url!r}: {exc}", field="cache") from None

    def _blob(self, sha: str) -> str:
        return f"{self.root}/blobs/{sha[:2]}/{sha}"

    def _entry(self, key: str) -> str:
        return f"{self.root}/entries/{key}.json"

    def _put_atomically(self, local: Path, remote: str) -> None:
        if not self.local:
            self.fs.put_file(str(local), remote)  # an object store's put is all or nothing
            return
        parent = remote.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        temporary = f"{parent}/.{uuid.uuid4().hex}.tmp"
        self.fs.put_file(str(local), temporary)
        os.replace(temporary, remote)  # same folder, same file system: atomic

    def fetch(self, key: str, outputs: list[tuple[str, Path]]) -> bool:
        """Put the stored outputs of `key` in place, each checked against its hash; False on a miss.

        Nothing is put in place unless every file arrived intact. A file replaces its output
        atomically, a folder (.mlpackage) replaces it whole; a declared output the entry does not
        hold (a skipped candidate has no bundle) is removed."""
        try:
            files = json.loads(self.fs.cat_file(self._entry(key)))["files"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return False
        staged, absent = [], []  # (temporary, output path); outputs the entry does not hold
        try:
            claimed = 0
            for name, path in outputs:
                members = {relative: described for relative, described in files.items()
                           if relative == name or relative.startswith(name + "/")}
                claimed += len(members)
                if not members:
                    absent.append(path)
                    continue
                temporary = path.with_name(f".{path.name}.tmp-fetch-{uuid.uuid4().hex[:8]}")  # a killed build's is cleared
                temporary.parent.mkdir(parents=True, exist_ok=True)
                staged.append((temporary, path))
                for relative, described in members.items():
                    local = temporary if relative == name else temporary / relative[len(name) + 1:]
                    local.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        self.fs.get_file(self._blob(described["sha256"]), str(local))
                    except FileNotFoundError:
                        return False
                    if sha256_file(local) != described["sha256"]:
                        self._forget(key, described["sha256"])  # corrupt: rebuilt and stored again
                        return False
            if claimed != len(files):
                return False  # an entry of another shape: not ours to trust
            for temporary, path in staged:
                replace_path(temporary, path)
            for path in absent:
                remove_path(path)
            return True
        finally:
            for temporary, _ in staged:
                remove_path(temporary)

    def _forget(self, key: str, sha: str) -> None:
        for path in (self._blob(sha), self._entry(key)):
            try:
                self.fs.rm_file(path)
            except (FileNotFoundError, OSError):
                pass

    def store(self, key: str, outputs: list[tuple[str, Path]]) -> None:
        """Store the outputs that exist: blobs first, then the entry that names them."""
        files = {}
        for name, path in outputs:
            for relative, file in _files(path, name):
                sha = content_sha256(file)
                files[relative] = {"sha256": sha, "bytes": file.stat().st_size}
                if not self.fs.exists(self._blob(sha)):
                    self._put_atomically(file, self._blob(sha))
        entry = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgebuild-entry-{uuid.uuid4().hex}.json"
        try:
            entry.write_text(json.dumps({"files": files}, sort_keys=True))
            self._put_atomically(entry, self._entry(key))
        finally:
            remove_path(entry)


def open_cache(value: str | None, root: Path) -> SharedCache | None:
    """The cache a build uses: a URL, or a folder (relative to the project); None without one."""
    if not value:
        return None
    if "://" not in value:
        value = str((root / value).resolve())
    return SharedCache(value)
