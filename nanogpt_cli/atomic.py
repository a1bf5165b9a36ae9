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


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary siblings of `path` (files or folders) that killed writers (SIGKILL, power
    loss) left behind; those of this process and of any process still running are left alone."""
    removed = []
    prefix = f".{path.name}.tmp-"
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*"):  # escaped: a name may hold "[" or "*"
        pid = tmp.name[len(prefix):]
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
