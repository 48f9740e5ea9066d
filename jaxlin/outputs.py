"""Everything jaxlin writes goes through here, and nothing it did not write is ever
replaced or deleted.

- A run directory carries a marker file (`.jaxlin-run`, JSON with the marker version and
  the run's kind); only a directory with that marker, or an empty one, may be replaced.
- `claim_output` is taken before any work: it refuses an output that is not a jaxlin run
  (or an earlier run, without `overwrite`), creates the parent directories, takes a lock
  (`.<name>.lock` beside the output, one run per output at a time) and removes staging
  left by killed runs (`.<name>.partial-*`, `.<name>.old-*`).
- Directories are written to a staging directory beside the target and renamed over it
  once complete. Every file (JSON, npz, PNG, HTML, markers) is written by
  `write_file_atomic`: beside its target, then renamed over it. A failed run leaves no
  partial file or directory behind.
- This process's staging paths and locks are kept in a registry so that `abandon` (run by
  the CLI on Ctrl-C, from another thread) can remove them before the process exits.
- In a run of several processes (`jaxlin.distributed`) only process 0 (`is_writer()`)
  claims the output and writes: the others hold a claim that touches nothing, and every
  write of theirs is skipped (its content not even rendered). Process 0 tells them
  whether its claim succeeded, so that a refused output stops every process at once.

A many-prompt output (kind "many") is not staged as a whole: its prompts/NNNN
directories are published one at a time so that a rerun resumes it (see
`many_prompts.run_many`); the aggregate files are replaced atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxlin.distributed import agree, is_writer, several_processes
from jaxlin.errors import JaxlinError

MARKER_NAME = ".jaxlin-run"
MARKER_VERSION = 1
# single: one text's run; many: a many-prompt output; prompt: one of its prompts/NNNN;
# study / bench: a length study or benchmark (jaxlin.length_study), one file per length.
RunKind = Literal["single", "many", "prompt", "study", "bench", "comparison"]
RUN_KINDS = ("single", "many", "prompt", "study", "bench", "comparison")
# Kinds written in place and resumed, with the folder of their per-item results.
IN_PLACE_KINDS = {"many": "prompts", "study": "lengths", "bench": "lengths", "comparison": "results"}

# Staging names are `.<target name>.partial-<random>[suffix]` (being written) and
# `.<target name>.old-<random>` (a replaced run on its way out).
_STAGING_INFIX = (".partial-", ".old-")
_ANY_STAGING = re.compile(r"^\..+\.(partial|old)-")


class OutputError(JaxlinError):
    pass


# Registry of this process's staging paths and claims. The lock also makes a publish (a
# few renames) atomic with respect to `abandon`.
_registry_lock = threading.RLock()
_staging: set[Path] = set()
_claims: list[OutputClaim] = []


def _mode(base: int) -> int:
    """`base` filtered by the process's umask (mkstemp/mkdtemp create private paths)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _remove(path: Path) -> None:
    """Remove a staging file or directory; retried because the main thread may still be
    writing into it when `abandon` runs."""
    for _ in range(20):
        if not os.path.lexists(path):
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _discard(path: Path) -> None:
    with _registry_lock:
        _staging.discard(path)
    _remove(path)


def _new_staging(target: Path, infix: str, directory: bool) -> Path:
    with _registry_lock:
        prefix = f".{target.name}{infix}"
        if directory:
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
            os.chmod(path, _mode(0o777))
        else:
            handle, name = tempfile.mkstemp(prefix=prefix, suffix=target.suffix, dir=target.parent)
            os.close(handle)
            path = Path(name)
            os.chmod(path, _mode(0o666))
        _staging.add(path)
    return path


# ----------------------------------------------------------------------------- markers


def run_kind(path: Path) -> str | None:
    """The kind of jaxlin run at `path`, or None when it is not one."""
    marker = path / MARKER_NAME
    try:
        if path.is_symlink() or not path.is_dir() or marker.is_symlink() or not marker.is_file():
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("jaxlin_run") != MARKER_VERSION:
        return None
    return data.get("kind") if data.get("kind") in RUN_KINDS else None


def _marker_text(kind: RunKind) -> str:
    return json.dumps({"jaxlin_run": MARKER_VERSION, "kind": kind}) + "\n"


def _state(path: Path) -> str:
    """absent | empty | a run kind | foreign (a file, a link, a directory without marker)."""
    if not os.path.lexists(path):
        return "absent"
    if path.is_symlink() or not path.is_dir():
        return "foreign"
    kind = run_kind(path)
    if kind is not None:
        return kind
    try:
        return "empty" if not any(path.iterdir()) else "foreign"
    except OSError:
        return "foreign"


# ----------------------------------------------------------------------------- writing


def write_file_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """The one way jaxlin writes a file (JSON, npz, PNG, HTML, markers): `write(staging)`
    writes it beside `path` under a staging name, and one rename then puts it in place, so
    `path` is never seen half-written, also inside a staging directory. The staging path
    keeps `path`'s suffix (matplotlib picks the format from it). A process other than the
    writer (see the module docstring) does not call `write` and writes nothing."""
    path = Path(path)
    if not is_writer():
        return path
    staging = _new_staging(path, ".partial-", directory=False)
    try:
        write(staging)
        with _registry_lock:
            os.replace(staging, path)
            _staging.discard(staging)
    finally:
        _discard(staging)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_file_atomic(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def json_text(data: dict[str, Any]) -> str:
    return json.dumps(_jsonable(data), indent=2, ensure_ascii=False) + "\n"


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    return write_text_atomic(path, json_text(data))


def write_npz_atomic(path: Path, arrays: dict[str, Any]) -> Path:
    """An .npz of `arrays` (compressed); a file object, so numpy cannot append `.npz` to
    the staging name."""

    def write(staging: Path) -> None:
        with open(staging, "wb") as sink:
            np.savez_compressed(sink, **{k: np.asarray(v) for k, v in arrays.items()})

    return write_file_atomic(path, write)


@contextlib.contextmanager
def staged_directory(target: Path, kind: RunKind) -> Iterator[Path]:
    """Yield a staging directory beside `target`; once the block completes it gets the run
    marker and replaces `target` (which must be absent, empty or a jaxlin run). A process
    other than the writer gets `target` itself, into which it writes nothing."""
    target = Path(target)
    if not is_writer():
        yield target
        return
    staging = _new_staging(target, ".partial-", directory=True)
    try:
        yield staging
        write_text_atomic(staging / MARKER_NAME, _marker_text(kind))
        _publish(staging, target)
    finally:
        _discard(staging)


def _publish(staging: Path, target: Path) -> None:
    retired: Path | None = None
    with _registry_lock:
        state = _state(target)
        if state == "foreign":
            raise OutputError(f"output_dir: {target} is not a jaxlin run; it was left as it is")
        if state in RUN_KINDS:
            # Move the old run aside first so the swap is one rename each way.
            retired = _new_staging(target, ".old-", directory=True)
            os.replace(target, retired / "run")
        # An empty directory is replaced by rename(2), which refuses one that is not empty.
        os.replace(staging, target)
        _staging.discard(staging)
    if retired is not None:
        _discard(retired)


def ensure_run_directory(target: Path, kind: RunKind) -> None:
    """A directory written in place (a many-prompt output): create it if needed and
    (re)write its marker, which also proves the directory writable."""
    make_directory(target)
    write_text_atomic(target / MARKER_NAME, _marker_text(kind))


def make_directory(path: Path) -> None:
    """A directory inside a claimed output (e.g. a many-prompt output's prompts/), made by
    the writer only."""
    if is_writer():
        path.mkdir(exist_ok=True)


# ----------------------------------------------------------------------------- claims


@dataclasses.dataclass
class OutputClaim:
    """An output location held by this process: `resume` when an earlier many-prompt
    output is continued in place."""

    target: Path
    kind: RunKind
    resume: bool
    lock_path: Path
    lock_fd: int
    created_dirs: list[Path]  # parents this claim created, outermost first
    target_existed: bool
    released: bool = False

    def release(self, failed: bool) -> None:
        """Drop the lock; after a failure also remove what the claim itself created and
        nothing was written into."""
        with _registry_lock:
            if self.released:
                return
            self.released = True
            if self in _claims:
                _claims.remove(self)
            if failed:
                self._undo_fresh_output()
            # Unlinked while still locked, so a waiting run sees a new file (see _lock).
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            os.close(self.lock_fd)
            if failed:
                for directory in reversed(self.created_dirs):
                    with contextlib.suppress(OSError):
                        directory.rmdir()  # only if still empty

    def _undo_fresh_output(self) -> None:
        """A many-prompt output started by this claim and never given a prompt: remove
        its marker and empty prompts/ directory (and the directory, if it created it)."""
        if self.kind not in IN_PLACE_KINDS or self.resume or run_kind(self.target) != self.kind:
            return
        prompts = self.target / IN_PLACE_KINDS[self.kind]
        with contextlib.suppress(OSError):
            if any(p.name not in (MARKER_NAME, prompts.name) for p in self.target.iterdir()):
                return
            if prompts.is_dir() and any(prompts.iterdir()):
                return  # a completed prompt: kept, a rerun resumes it
            if prompts.is_dir():
                prompts.rmdir()
            (self.target / MARKER_NAME).unlink()
            if not self.target_existed:
                self.target.rmdir()


def _make_parents(directory: Path) -> list[Path]:
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            raise OutputError(f"output_dir: cannot create {path} ({error.strerror})") from None
        created.append(path)
    if not directory.is_dir() and not missing:
        raise OutputError(f"output_dir: {directory} is not a directory")
    return created


def _lock(lock_path: Path, target: Path) -> int:
    """flock a lock file beside the output (non-blocking). The file is removed on release
    while locked, so the inode check makes sure the lock is on the file now at that path."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _mode(0o666))
        except OSError as error:
            raise OutputError(f"output_dir: cannot write in {lock_path.parent} ({error.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(
                    f"output_dir: {target} is in use by another jaxlin run (lock {lock_path}); "
                    "wait for it to finish or choose another output_dir"
                ) from None
            raise OutputError(f"output_dir: cannot lock {lock_path} ({error.strerror})") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _remove_stale(directory: Path, name: str | None) -> None:
    """Staging left by killed runs: `.<name>.partial-*` / `.<name>.old-*` beside an output
    (or any such name inside a jaxlin run we hold)."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        if name is None:
            stale = _ANY_STAGING.match(entry.name) is not None
        else:
            stale = any(entry.name.startswith(f".{name}{infix}") for infix in _STAGING_INFIX)
        if stale:
            _remove(entry)


def _check_existing(target: Path, kind: RunKind, overwrite: bool) -> bool:
    """Whether the output may be used; True when it is a many-prompt output to resume."""
    state = _state(target)
    if state == "foreign":
        what = "a file" if target.is_file() else "a link" if target.is_symlink() else "a directory"
        raise OutputError(
            f"output_dir: {target} is {what} that is not a jaxlin run; jaxlin replaces only run "
            "directories it wrote (choose another output_dir)"
        )
    if kind in IN_PLACE_KINDS and state == kind:
        return True
    if state in RUN_KINDS and not overwrite:
        raise OutputError(
            f"output_dir: {target} holds an earlier jaxlin run; pass --overwrite (or overwrite: true) "
            "to replace it"
        )
    return False


@contextlib.contextmanager
def claim_output(target: str | Path, kind: RunKind, overwrite: bool) -> Iterator[OutputClaim]:
    """Check and lock an output location before any work (see the module docstring).

    A many-prompt output resumes an earlier many-prompt output in place, with or without
    `overwrite`: a prompt is reused only when its text and analysis settings match, and
    results are deterministic, so resuming gives what a fresh run would."""
    target = Path(target)
    if target.name in ("", ".", ".."):
        raise OutputError(f"output_dir: {target} does not name a directory")
    if not is_writer():
        if not agree(True):
            raise OutputError(f"output_dir: process 0 could not claim {target} (see its message)")
        # Nothing checked, locked or created, so nothing to release: it writes nothing.
        yield OutputClaim(
            target,
            kind,
            resume=False,
            lock_path=target,
            lock_fd=-1,
            created_dirs=[],
            target_existed=False,
            released=True,
        )
        return
    try:
        claim = _take(target, kind, overwrite)
    except BaseException:
        agree(False)
        raise
    agree(True)
    failed = True
    try:
        yield claim
        failed = False
    finally:
        claim.release(failed)


def _take(target: Path, kind: RunKind, overwrite: bool) -> OutputClaim:
    """`claim_output`'s claim, held (and released again if taking it fails)."""
    _check_existing(target, kind, overwrite)  # refuse before touching the filesystem
    created = _make_parents(target.parent)
    lock_path = target.parent / f".{target.name}.lock"
    try:
        fd = _lock(lock_path, target)
    except BaseException:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    claim = OutputClaim(target, kind, False, lock_path, fd, created, os.path.lexists(target))
    with _registry_lock:
        _claims.append(claim)
    try:
        claim.resume = _check_existing(target, kind, overwrite)  # again, now that we hold the lock
        if claim.resume and several_processes():
            # Every process must run the same computations, and only process 0 reads
            # which items an earlier run completed.
            raise OutputError(
                f"output_dir: {target} holds an earlier {kind} output, which a run of several "
                "processes cannot resume (choose another output_dir, or resume it with one process)"
            )
        _remove_stale(target.parent, target.name)
        if claim.resume:
            _remove_stale(target, None)
            _remove_stale(target / IN_PLACE_KINDS[kind], None)
        elif kind in IN_PLACE_KINDS and _state(target) in RUN_KINDS:
            # --overwrite of another kind of run by a many-prompt output (written in place).
            retired = _new_staging(target, ".old-", directory=True)
            os.replace(target, retired / "run")
            _discard(retired)
            claim.target_existed = False
        if kind in IN_PLACE_KINDS:
            try:
                ensure_run_directory(target, kind)
            except OSError as error:
                raise OutputError(f"output_dir: cannot write in {target} ({error.strerror})") from None
    except BaseException:
        claim.release(failed=True)
        raise
    return claim


def abandon() -> None:
    """Remove this process's staging paths and release its claims (on Ctrl-C, from
    another thread, just before the process exits). Holding the registry lock until the
    process exits keeps the main thread from publishing half a swap."""
    _registry_lock.acquire()
    for path in list(_staging):
        _remove(path)
    _staging.clear()
    for claim in list(_claims):
        claim.release(failed=True)
