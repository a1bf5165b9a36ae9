"""Files that appear whole or not at all, created where nothing planted can redirect them.

Every file is built under a fresh, unguessable temporary name in its target's folder, created with
O_EXCL|O_NOFOLLOW (a symlink or file planted there makes the creation fail, never the write go
elsewhere), and renamed into place when complete; a rename replaces a symlink at the target instead
of following it. What a killed writer left is removed later (`remove_stale_temps`).

Prepared datasets (`prepare.writer`), exports (`hf.export_hf`), traces (`bench`) and downloads
(`download`) follow this rule; checkpoints (`checkpoint.atomic_save`) take their temporary names
from `temp_sibling`. Also here: reading only regular
files (`open_regular`: a FIFO or a device never blocks or streams forever), names from a data file that
must stay in their folder (`file_in_folder`), writer locks (`exclusive_lock`), and signals that stop a
write cleanly (`stop_on_signals`, `signals_deferred`). Light to import: no torch, no numpy.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from nanogpt_cli.errors import NgptError, UsageError, emit_error, one_line

DOWNLOAD_TIMEOUT_S = 60  # a download that receives no byte for this long has stalled
STALL_BYTES = 16 << 10  # ... and so has one that receives fewer bytes than this in that time (a trickle)
LOCK_NAME = ".lock"  # the writer lock inside a folder being written (a prepared dataset)

_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def temp_sibling(path: Path) -> Path:
    """A fresh name beside `path` to build it under: `.<name>.tmp-<pid>-<random>` (the pid lets a later
    run tell a killed writer's leftovers from a live one's; the random part makes the name unguessable)."""
    return path.with_name(_temp_prefix(path) + secrets.token_hex(4))


def new_file(path: Path, buffering: int = -1) -> BinaryIO:
    """Open `path` for writing, creating it: fails if anything (a file, a symlink) is there already."""
    return os.fdopen(os.open(path, _NEW_FILE_FLAGS, 0o666), "wb", buffering=buffering)


def _default_mode(mode: int) -> int:
    """`mode` less the process's umask: what a plain `open` or `mkdir` would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def temp_folder(path: Path) -> Path:
    """Create an empty temporary folder beside `path` (to be renamed to `path`), with the usual permissions."""
    folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    os.chmod(folder, _default_mode(0o777))
    return folder


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write `path` whole or not at all: the block writes a new temporary file beside it, which is
    flushed, fsynced and renamed over `path` when the block ends; an error or a signal removes it."""
    path = Path(path)
    tmp = temp_sibling(path)
    f = new_file(tmp)  # before the cleanup below: what was there already (planted) is no file of ours
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_folder(path.parent)
    remove_stale_temps(path)


def replace_folder(built: Path, dest: Path) -> None:
    """Put the finished folder `built` at `dest`, replacing what is there (a folder, whole): the old one
    steps aside under a temporary name, the new one is renamed in, and the old one is deleted, with
    signals held off between the two renames."""
    old = None
    with signals_deferred():
        if dest.is_symlink() or dest.exists():
            old = temp_sibling(dest)
            os.rename(dest, old)
        os.rename(built, dest)
    fsync_folder(dest.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def open_append_nofollow(path: Path):
    """`path` opened to append text, created if missing; a symlink at `path` is refused (ELOOP), not followed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary siblings of `path` (files or folders) that killed writers (SIGKILL, power
    loss) left behind; those of this process and of any process still running are left alone.
    A symlink among them is removed itself, never what it points to."""
    removed = []
    prefix = f".{path.name}.tmp-"
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*"):  # escaped: a name may hold "[" or "*"
        pid = tmp.name[len(prefix):].partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Reading: only regular files, only inside their folder.

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symlink"}


def _file_kind(mode: int) -> str:
    """What a stat mode says the file is, in words ("a FIFO (named pipe)", "a character device", ...)."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_regular(path: Path, what: str = "") -> None:
    """Refuse (a usage error) a path that is not a regular file once symlinks are followed: a FIFO would
    block, a device such as /dev/zero would stream forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise UsageError(f"{what or path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"{what or path} is {_file_kind(mode)}, not a regular file")


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading if it is a regular file (checked on the opened file, so nothing can be
    swapped in between), without ever blocking on a FIFO; else a usage error naming the path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket
            raise UsageError(f"{path} is a socket, not a regular file") from None
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UsageError(f"{path} is {_file_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def file_in_folder(folder: Path, name: object, what: str) -> Path:
    """`folder / name` for a file name read from a data file (meta.json): a plain name (no folder part,
    no `..`, not absolute) of a regular file (not a symlink) inside `folder`; else an error naming `what`."""
    if not isinstance(name, str) or not name or name in (".", "..") or name != os.path.basename(name) \
            or "\\" in name or "\0" in name:
        raise NgptError(f"{what}: {name!r} is not a file name inside {folder}; prepare the dataset again")
    path = folder / name
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise NgptError(f"{path} is missing; prepare the dataset again with --force") from None
    except OSError as e:
        raise NgptError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise NgptError(f"{what}: {path} is {_file_kind(mode)}, not a regular file inside {folder}; "
                        "prepare the dataset again")
    return path


# ---------------------------------------------------------------------------------------------
# Writer locks.


def _lock_holders(fd: int) -> list[int]:
    """The pids holding locks on the file open at `fd`, from /proc/locks (Linux); [] elsewhere."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    with contextlib.suppress(OSError):
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] != "->" and fields[5] == key and fields[4].isdigit():
                    pids.append(int(fields[4]))
    return [pid for pid in pids if pid != os.getpid()]


def _lock_holder(fd: int) -> int | None:
    """Who holds the lock: the pid its holder wrote into the file, else the kernel's record of it."""
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode("ascii").strip())
    holders = _lock_holders(fd)
    return holders[0] if holders else None


def _open_lock_file(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o644)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UsageError(f"{path} is {_file_kind(mode)}, not the lock file it should be; remove it")
    return fd


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str, advice: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created, never through a symlink) while the block runs;
    the file holds this process's pid meanwhile and is removed at the end. Another process holding it
    is a usage error: "<what> is being written by another process (pid N); <advice>"."""
    import fcntl

    for _ in range(100):
        try:
            fd = _open_lock_file(path)
        except OSError as e:
            raise NgptError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _lock_holder(fd)
            os.close(fd)
            holder = f" (pid {pid})" if pid else ""
            raise UsageError(f"{what} is being written by another process{holder}; {advice}") from None
        except OSError:  # a file system without locks: go on unlocked, as before locks existed
            break
        with contextlib.suppress(OSError):  # the previous holder removed the file as we opened it: retry
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                break
        os.close(fd)
    else:
        raise NgptError(f"could not lock {path}: it keeps being replaced")
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it, so nobody locks a file that is going away
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Signals: SIGTERM stops a write as Ctrl-C does; a rename sequence is never cut in two.


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every cleanup path runs."""


def _raise_terminated(signum, frame):
    raise Terminated


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Around a command that writes files: SIGTERM raises `Terminated` (Ctrl-C raises KeyboardInterrupt),
    so temporary files are removed on the way out; the command then exits 143 with one line."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _in_main_thread() else None
    try:
        yield
    except Terminated:
        emit_error("error: stopped by SIGTERM; nothing was left half-written")
        raise SystemExit(143) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM off while the block runs (a few renames), then deliver the first that came."""
    if not _in_main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            signal.raise_signal(arrived[0])


# ---------------------------------------------------------------------------------------------
# Downloads.


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or url


def _receive(response, f: BinaryIO, url: str, advice: str) -> int:
    """Copy the response body to `f`, failing if it stalls (nothing for DOWNLOAD_TIMEOUT_S seconds: the
    socket's timeout; or fewer than STALL_BYTES in that time: a trickle); returns the bytes received."""
    received = window_bytes = 0
    window_start = time.monotonic()
    while block := response.read1(1 << 20):
        f.write(block)
        received += len(block)
        window_bytes += len(block)
        now = time.monotonic()
        if now - window_start >= DOWNLOAD_TIMEOUT_S:
            if window_bytes < STALL_BYTES:
                raise NgptError(f"could not download {url}: {_host(url)} sent {window_bytes} bytes in "
                                f"{now - window_start:.0f} s (stalled); try again, or {advice}")
            window_start, window_bytes = now, 0
    return received


def _is_network_error(e: BaseException) -> bool:
    import http.client
    import ssl
    import urllib.error

    return isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError,
                          http.client.HTTPException))


def download(url: str, target: Path, option: str) -> None:
    """Fetch `url` into `target` atomically, whole or not at all: a body shorter than its Content-Length,
    or one that stalls, is refused and nothing is cached. Without network, the error names `option`, the
    way to pass a copy downloaded elsewhere ("--source", "--lambada-file")."""
    import http.client
    import urllib.request

    advice = f"without network, download it elsewhere and pass {option} PATH"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, atomic_file(target) as f:
            expected = response.headers.get("Content-Length")
            received = _receive(response, f, url, advice)
            if expected is not None and expected.isdigit() and received != int(expected):
                raise NgptError(f"could not download {url}: {_host(url)} sent {received} of {expected} bytes "
                                f"(cut short); try again, or {advice}")
    except (OSError, http.client.HTTPException) as e:
        if not _is_network_error(e):  # the disk: the cache folder cannot be written
            raise NgptError(f"could not write {target}: {e.strerror or one_line(e)}") from None
        reason = one_line(getattr(e, "reason", None) or e)
        if isinstance(e, TimeoutError) or "timed out" in reason:
            reason = f"{_host(url)} sent nothing for {DOWNLOAD_TIMEOUT_S} s: {reason}"
        raise NgptError(f"could not download {url} ({reason}); {advice}") from None
