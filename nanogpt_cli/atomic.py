"""Files that appear whole or not at all: each is built as a hidden temporary sibling named with the
writer's pid and renamed into place when complete; what a killed writer left is removed later.

Checkpoints (`checkpoint.atomic_save`), prepared datasets (`prepare.writer`, a temporary folder) and
downloads (`download`) all follow this one rule. Light to import: no torch, no numpy.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from pathlib import Path

from nanogpt_cli.errors import NgptError, one_line

DOWNLOAD_TIMEOUT_S = 60


def temp_sibling(path: Path) -> Path:
    """Where this process builds `path` before renaming it into place: `.<name>.tmp-<pid>` beside it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def new_temp_sibling(path: Path) -> tuple[int, Path]:
    """(fd, path) of a new temporary sibling of `path`, `.<name>.tmp-<pid>-<random>`, created exclusively
    (O_EXCL: never an existing file, never through a link planted at the name, which is not predictable)."""
    import tempfile

    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    return fd, Path(name)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` as a whole: a new temporary sibling, fsynced, renamed over `path` (a rename
    replaces a symlink at `path` itself, never the file it points to)."""
    fd, tmp = new_temp_sibling(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_append_nofollow(path: Path):
    """`path` opened to append text, created if missing; a symlink at `path` is refused (ELOOP), not followed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary siblings of `path` (files or folders) that killed writers (SIGKILL, power
    loss) left behind; those of this process and of any process still running are left alone."""
    removed = []
    prefix = f".{path.name}.tmp-"
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*"):  # escaped: a name may hold "[" or "*"
        pid = tmp.name[len(prefix):].split("-")[0]  # .<name>.tmp-<pid> or .<name>.tmp-<pid>-<random>
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


def download(url: str, target: Path, option: str) -> None:
    """Fetch `url` into `target` atomically. Without network, the error names `option`, the way
    to pass a copy downloaded elsewhere ("--source", "--lambada-file")."""
    import urllib.request

    partial = temp_sibling(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        os.replace(partial, target)
    except OSError as e:  # URLError, HTTPError, timeouts and disk errors are all OSErrors
        reason = one_line(getattr(e, "reason", None) or e)
        raise NgptError(f"could not download {url} ({reason}); without network, download it elsewhere "
                        f"and pass {option} PATH") from None
    finally:
        partial.unlink(missing_ok=True)
    remove_stale_temps(target)
