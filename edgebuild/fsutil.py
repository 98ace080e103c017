"""File helpers: atomic writes, content hashes, store-like download sizes."""
import functools
import hashlib
import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: same files, same zip, same byte count
# coremltools rewrites an .mlpackage's Manifest.json whenever it opens the package, also to read
# it: through a temporary Manifest.<uuid> beside it, renamed over the old one. Another stage may
# be reading the package while a bundle is hashed or copied: that file is not part of the bundle.
_TRANSIENT = re.compile(r"Manifest\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(path: Path) -> str:
    """`sha256_file`, remembered per file identity (path, inode, size, mtime) in this process: cache
    keys hash every file a stage reads, and a sharded data set's gigabytes are read by many stages."""
    stat = os.stat(path)
    return _content_sha256(str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _content_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def read_tree(paths, root: Path) -> dict[str, bytes]:
    """Every file of `paths` (files, or folders such as a .mlpackage), by path relative to `root`:
    what crosses to another machine."""
    return {file.relative_to(root).as_posix(): file.read_bytes()
            for path in paths if Path(path).exists() for file in bundle_files(path)}


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    """`read_tree`'s files written back under `root`."""
    for relative, content in files.items():
        path = Path(root) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def bundle_files(path: Path) -> list[Path]:
    """The files of a bundle: the file itself, or every file of a bundle folder (.mlpackage)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if not _TRANSIENT.fullmatch(p.name) and p.is_file())


def copy_bundle(source: Path, destination: Path) -> None:
    """Copy a bundle file or folder, without the transient files a reader may be writing in it."""
    if Path(source).is_dir():
        shutil.copytree(source, destination, ignore=lambda folder, names: [n for n in names if _TRANSIENT.fullmatch(n)])
    else:
        shutil.copyfile(source, destination)


def bundle_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's relative paths and contents."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in bundle_files(path):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def bundle_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in bundle_files(path))


def bundle_download_bytes(path: Path) -> int:
    return download_bytes(bundle_files(path), Path(path).parent)


def remove_path(path: Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(source: Path, destination: Path) -> None:
    """Move a finished file or folder into place (a folder replaces the old one whole)."""
    if Path(source).is_dir():
        if Path(destination).exists():
            old = Path(destination).with_name(f".{Path(destination).name}.old-{os.getpid()}")
            os.replace(destination, old)
            os.replace(source, destination)
            remove_path(old)
        else:
            os.replace(source, destination)
    else:
        os.replace(source, destination)


def atomic_write_bytes(path: Path, data: bytes, temp_dir: Path | None = None) -> None:
    """Write via a temporary file and rename: readers see old or new, never half.

    The temporary file sits in `temp_dir` (same file system) when given, so a crash leaves no
    stray file next to `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = temp_dir or path.parent
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{path.name}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def atomic_write_text(path: Path, text: str, temp_dir: Path | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), temp_dir)


def atomic_write_json(path: Path, value, temp_dir: Path | None = None) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False, allow_nan=False) + "\n", temp_dir)


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def atomic_output(path: Path) -> Path:
    """A temporary sibling for a tool that insists on writing a path itself; rename it when done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


class _CountingSink(io.RawIOBase):
    """A seekable file that keeps no bytes, only how long it would be: zipfile seeks back to finish
    each local header, exactly as it does in a real file, so the count is the zip's true size."""

    def __init__(self):
        super().__init__()
        self.position = self.size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        length = len(memoryview(data))
        self.position += length
        self.size = max(self.size, self.position)
        return length

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position


def download_bytes(paths: list[Path], root: Path) -> int:
    """Bytes of a deflate zip of the files, as an app store measures a compressed download.

    The zip is streamed through a counter, a megabyte at a time: an LLM's bundle is never held in
    memory, neither whole nor compressed.
    """
    sink = _CountingSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(paths):
            info = zipfile.ZipInfo(Path(path).relative_to(root).as_posix(), date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.file_size = Path(path).stat().st_size  # as writestr sets it: same headers, same bytes
            info._compresslevel = 9  # what writestr(..., compresslevel=9) sets; open() reads it
            with open(path, "rb") as source, archive.open(info, "w") as entry:
                shutil.copyfileobj(source, entry, 1 << 20)
    return sink.size


def replace_dir(staged: Path, destination: Path, trash: Path) -> None:
    """Swap a fully written folder into place; at every moment the destination is old, new or absent."""
    trash.mkdir(parents=True, exist_ok=True)
    old = trash / f"{destination.name}-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        os.replace(destination, old)
    os.replace(staged, destination)
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(destination: Path, trash: Path) -> None:
    if destination.exists():
        trash.mkdir(parents=True, exist_ok=True)
        old = trash / f"{destination.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(destination, old)
        shutil.rmtree(old, ignore_errors=True)


def record_matches(record_path: Path, output: Path) -> bool:
    """A cached output counts only if its stage succeeded and its bytes still hash to the record.

    Used as a doit `uptodate` check: a failed, deleted or corrupted output is rebuilt, not trusted.
    """
    try:
        record = read_json(record_path)
    except (OSError, ValueError):
        return False
    return record.get("status", "ok") == "ok" and Path(output).exists() and bundle_sha256(output) == record.get("sha256")
