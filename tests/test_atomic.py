"""Whole-or-nothing files: temporary siblings, their cleanup after killed writers, atomic downloads."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from nanogpt_cli.atomic import download, remove_stale_temps, temp_sibling
from nanogpt_cli.errors import NgptError


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_killed_writers_go_files_and_folders_alike(tmp_path):
    target = tmp_path / "data[1]"  # glob characters in the name are matched literally
    assert temp_sibling(target) == tmp_path / f".data[1].tmp-{os.getpid()}"
    pid = dead_pid()
    stale_file, stale_folder = tmp_path / f".data[1].tmp-{pid}", tmp_path / f".data[1].tmp-{pid + 1_000_000}"
    stale_file.write_bytes(b"half")
    stale_folder.mkdir()
    (stale_folder / "train.bin").write_bytes(b"half")
    kept = [tmp_path / f".data[1].tmp-{os.getppid()}",  # a running process's write in progress
            temp_sibling(target),  # this process's own
            tmp_path / ".data[1].tmp-notapid", tmp_path / f".other.tmp-{pid}"]
    for path in kept:
        path.write_bytes(b"half")
    assert sorted(remove_stale_temps(target)) == sorted([stale_file, stale_folder])
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_download_is_atomic_and_says_what_to_do_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"text\n"))
    stale = tmp_path / "cache" / f".input.txt.tmp-{dead_pid()}"  # a download killed earlier
    stale.parent.mkdir()
    stale.write_bytes(b"te")
    download("https://example.org/input.txt", tmp_path / "cache" / "input.txt", "--source")
    assert os.listdir(tmp_path / "cache") == ["input.txt"]
    assert (tmp_path / "cache" / "input.txt").read_bytes() == b"text\n"

    class Broken(io.BytesIO):
        def read(self, *args):
            raise TimeoutError("The read operation timed out")

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Broken())
    with pytest.raises(NgptError, match=r"^could not download https://example.org/b.txt \(The read operation timed "
                                        r"out\); without network, download it elsewhere and pass --source PATH$"):
        download("https://example.org/b.txt", tmp_path / "cache" / "b.txt", "--source")
    assert os.listdir(tmp_path / "cache") == ["input.txt"]  # no partial file

    def offline(url, timeout):
        raise urllib.error.URLError(OSError("[Errno -3] Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(NgptError, match=r"\(\[Errno -3\] Temporary failure in name resolution\)"):
        download("https://example.org/c.txt", tmp_path / "cache" / "c.txt", "--lambada-file")
