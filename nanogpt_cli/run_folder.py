"""The run folder (out_dir) as a training run holds it: refused when it already holds a run that was not
asked to be replaced, probed for writability before any work, and locked while the run writes there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from nanogpt_cli import checkpoint as ckpt_io
from nanogpt_cli import lora
from nanogpt_cli.atomic import new_file, temp_sibling
from nanogpt_cli.errors import NgptError, UsageError


def check_out_dir(out_dir: Path) -> None:
    """Fail before training, not at the first checkpoint, when out_dir cannot be written.

    Leaves the disk as it found it: the probe file and the folders made for it are removed again,
    so a run refused later (a missing dataset, a checkpoint that does not fit) changes nothing."""
    created = []  # the folders this check makes, deepest first
    for parent in (out_dir, *out_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NgptError(f"cannot use out_dir {out_dir}: {parent} is a file, not a folder")
            break
        created.append(parent)
    probe = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = temp_sibling(out_dir / ".write-test")
        with new_file(probe) as f:  # exclusive; written through to the disk: a full disk fails here, not hours later
            f.write(b"0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise NgptError(f"cannot write to out_dir {out_dir}: {e.strerror or e}") from None
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                probe.unlink()
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()


RUN_FILES = (ckpt_io.CKPT_NAME, "metrics.jsonl", "config.toml", lora.ADAPTER_DIR)  # what a run leaves in out_dir


def check_no_run_to_replace(out_dir: Path, resuming: bool, overwrite: bool) -> None:
    """A new run (not a resume) into a folder that holds a run is refused unless told to replace it."""
    if resuming or overwrite or not any((out_dir / name).exists() for name in RUN_FILES):
        return
    held = (f"a checkpoint at iteration {ckpt_io.peek_iteration(out_dir)}" if (out_dir / ckpt_io.CKPT_NAME).exists()
            else "a run's files")
    raise UsageError(f"out_dir {out_dir} holds {held}: continue it with --init_from=resume, replace it with "
                     "--overwrite, or choose another --out_dir")


class RunLock:
    """The run folder's lock, held while a run writes there (fcntl.flock on `.ngpt-lock`, which names the
    holder's pid, and is removed when the run ends): a second run into the same folder is refused instead of
    interleaving its files."""

    NAME = ".ngpt-lock"

    def __init__(self, out_dir: Path):
        self.path, self.fd = out_dir / self.NAME, None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UsageError(f"out_dir {self.path.parent} is in use by a running training (pid {holder}); "
                                 "wait for it to end, or choose another --out_dir") from None
            try:
                if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the file as we opened it: take the lock on the current one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # removed while held, so no one can lock the removed file
            os.close(self.fd)
            self.fd = None


def remove_run(out_dir: Path) -> None:
    """Delete the run in out_dir (--overwrite, once the new run has set up): its checkpoint, metrics, config
    and adapters; a link among them goes, never what it points to."""
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
