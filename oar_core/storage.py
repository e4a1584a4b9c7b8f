"""Local-or-S3 files: paths, atomic writes (temp name, then rename), reads, listing, scratch folders,
and S3 failures turned into one actionable line."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import fsspec


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def join(prefix: str | os.PathLike, name: str) -> str:
    """`prefix/name` for a local folder or a URL prefix."""
    return f"{str(prefix).rstrip('/')}/{name}" if is_remote(prefix) else str(Path(prefix) / name)


S3_TIMEOUT_S = 10.0  # connect and read timeout per S3 attempt (ingest.s3_timeout_s sets it for its stage)


def fs_for(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a local path or URL (s3:// uses s3fs,
    which honours AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL for S3-compatible servers). An endpoint that
    accepts connections and never answers fails after AWS_MAX_ATTEMPTS attempts of S3_TIMEOUT_S each (botocore's
    own read timeout is 60 s), with a line per retry so a slow endpoint is not a silent hang."""
    opts = {}
    if str(path).startswith("s3://"):
        opts = {"config_kwargs": {"connect_timeout": S3_TIMEOUT_S, "read_timeout": S3_TIMEOUT_S}}
        _report_s3_retries()
    fs, _, (p,) = fsspec.get_fs_token_paths(str(path), storage_options=opts)
    if opts:
        fs.retries = 1  # s3fs's own loop (5 tries) would multiply botocore's attempts: botocore alone retries
    return fs, p


class _RetryLine(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Retry needed"):
            endpoint = os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
            print(f"[storage] no answer from {endpoint} within {S3_TIMEOUT_S:g} s or a failed request; retrying "
                  f"(at most AWS_MAX_ATTEMPTS={os.environ.get('AWS_MAX_ATTEMPTS', '5')} attempts)", file=sys.stderr,
                  flush=True)


def _report_s3_retries() -> None:
    for name in ("botocore.retries.standard", "botocore.retryhandler"):
        log = logging.getLogger(name)
        if not any(isinstance(h, _RetryLine) for h in log.handlers):
            log.addHandler(_RetryLine(logging.DEBUG))
            log.setLevel(logging.DEBUG)
            log.propagate = False  # its other debug lines must not reach handlers a host app put on the root


class StorageError(ValueError):
    """A remote-storage failure turned into one actionable line (a ValueError, so stage scripts print it)."""


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike, action: str = "access") -> Iterator[None]:
    """Turn botocore/s3fs failures on an s3:// path (unreachable endpoint, bad credentials, denied access)
    into a StorageError naming the path and what to check. FileNotFoundError passes through untouched (its
    callers add their own hint). Retries stay bounded: botocore retries connection errors AWS_MAX_ATTEMPTS
    times (default 5, ~5-10 s against a closed port) before we get here."""
    if not is_remote(path):
        yield
        return
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except Exception as e:  # botocore is imported lazily: it is only there with s3fs
        raise _storage_error(path, action, e) from None


def _storage_error(path, action: str, e: Exception) -> Exception:
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover
        bx = None
    endpoint = (os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
                or "the default AWS endpoint")
    detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    if bx is not None and isinstance(e, bx.NoCredentialsError):
        return StorageError(f"{path}: cannot {action}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if bx is not None and isinstance(e, (bx.ReadTimeoutError, bx.ConnectTimeoutError)) or isinstance(e, TimeoutError):
        attempts = os.environ.get("AWS_MAX_ATTEMPTS") or "5"
        return StorageError(f"{path}: cannot {action}: S3 endpoint {endpoint} did not answer within {S3_TIMEOUT_S:g} s "
                            f"in {attempts} attempts; check that the server is up and not overloaded, "
                            f"AWS_ENDPOINT_URL, or raise ingest.s3_timeout_s")
    if bx is not None and isinstance(e, (bx.ConnectionError, bx.HTTPClientError)) or isinstance(e, ConnectionError):
        attempts = os.environ.get("AWS_MAX_ATTEMPTS") or "5"  # botocore's legacy-mode default
        return StorageError(f"{path}: cannot {action}: S3 endpoint {endpoint} unreachable after {attempts} attempts "
                            f"({detail}); check AWS_ENDPOINT_URL, the network/proxy, and that the server is up")
    if isinstance(e, PermissionError) or (bx is not None and isinstance(e, bx.ClientError)):
        return StorageError(f"{path}: cannot {action}: S3 refused the request ({detail}); check AWS_ACCESS_KEY_ID / "
                            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), the endpoint {endpoint}, and the bucket's "
                            f"permissions")
    if isinstance(e, OSError) or (bx is not None and isinstance(e, bx.BotoCoreError)):
        return StorageError(f"{path}: cannot {action}: S3 request failed ({detail}); check AWS_ENDPOINT_URL "
                            f"({endpoint}) and your AWS_* credentials")
    return e


def _umask() -> int:
    """This process's umask, from the kernel's own report (reading it with os.umask would set it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary local path beside `path`; rename it over `path` only if the block succeeds,
    so a half-written file is never visible under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish_file(tmp, path)
    except OSError as e:  # disk full while writing the temp file: name the artifact, not the temp name
        if e.filename == tmp:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish_file(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move a finished local file to `dest` in one step: a rename within its folder, or one PUT to S3."""
    if is_remote(dest):
        with storage_errors(dest, "write"):
            fs, p = fs_for(dest)
            fs.put_file(str(tmp), p)
        os.remove(tmp)
        return
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's private 0600 would otherwise become the artifact's mode
    os.replace(tmp, dest)


def remove_file(path: str | os.PathLike) -> None:
    """Remove a local or S3 file if it is there."""
    with storage_errors(path, "remove"):
        fs, p = fs_for(path)
        if fs.exists(p):
            fs.rm(p)


def swap_in(staged: Path, final: Path) -> None:
    """Replace the folder (or file) `final` with `staged` by two renames, so a reader sees the old one or the new one,
    never a mix. A run killed between them leaves the old one hidden at `.NAME.old.partial`; the next swap removes
    it."""
    old = final.parent / f".{final.name}.old.partial"
    remove_path(old)
    if final.exists() or final.is_symlink():
        os.rename(final, old)
    os.rename(staged, final)
    remove_path(old)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _process_start() -> float:
    """When this process started (the kernel's clock ticks since boot, turned into wall time)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden `.NAME.*.tmp` files that a process killed inside `atomic_path` leaves behind. Another
    process may be writing into `folder` right now, so a temp file newer than this process, or one a live
    writer holds a flock on (order_table.write_part does), is left alone."""
    stale, started = [], _process_start()
    for f in sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []:
        try:
            with f.open("rb") as fh:
                if os.fstat(fh.fileno()).st_mtime < started:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    f.unlink()
                    stale.append(f)
        except (FileNotFoundError, BlockingIOError):
            pass  # finished (renamed) meanwhile, or still being written
    return stale


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Atomic for local paths; for S3 a single PUT is already all-or-nothing."""
    if is_remote(path):
        with storage_errors(path, "write"):
            fs, p = fs_for(path)
            with fs.open(p, "wb") as f:
                f.write(data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_bytes(path: str | os.PathLike) -> bytes:
    with storage_errors(path, "read"):
        fs, p = fs_for(path)
        with fs.open(p, "rb") as f:
            return f.read()


def read_json(path: str | os.PathLike, missing: str, fix: str) -> Any:
    """A JSON artifact; a missing or corrupt one is one line naming the file and the fix."""
    try:
        return json.loads(read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt JSON ({e}); {fix}") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_hash(path: str | os.PathLike) -> str:
    return hashlib.sha256(read_bytes(path)).hexdigest()[:16]


def list_files(prefix: str | os.PathLike, pattern: str) -> list[str]:
    """Sorted files matching `pattern` under a local folder or URL prefix, returned as usable paths/URLs."""
    with storage_errors(prefix, "list"):
        fs, p = fs_for(prefix)
        found = sorted(fs.glob(f"{p.rstrip('/')}/{pattern}"))
    if is_remote(prefix):
        scheme = str(prefix).split("://", 1)[0]
        return [f"{scheme}://{f}" for f in found]
    return found


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A scratch folder in the system temp dir, named `<prefix>-<pid>-*` so that the ones a killed run leaked are
    found and removed here (their process is gone)."""
    root = Path(tempfile.gettempdir())
    for d in root.glob(f"{prefix}-*-*"):
        pid = d.name[len(prefix) + 1:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}-{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
