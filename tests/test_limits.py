"""limits: the memory a process can get, container limits included."""

from __future__ import annotations

import nanogpt_cli.limits as limits


def test_available_memory_is_at_most_what_a_cgroup_limit_leaves(monkeypatch):
    machine = limits.available_memory_bytes()
    assert 0 < machine <= limits.host_memory_bytes()
    files = {"/sys/fs/cgroup/memory.max": 3 * 2**30, "/sys/fs/cgroup/memory.current": 2**30}
    monkeypatch.setattr(limits, "_read_number", files.get)
    assert limits.available_memory_bytes() == min(machine, 2 * 2**30)
    files["/sys/fs/cgroup/memory.current"] = 4 * 2**30  # over its limit: nothing is left
    assert limits.available_memory_bytes() == 0
    v1 = {"/sys/fs/cgroup/memory/memory.limit_in_bytes": 2**30, "/sys/fs/cgroup/memory/memory.usage_in_bytes": 2**29}
    monkeypatch.setattr(limits, "_read_number", v1.get)
    assert limits.available_memory_bytes() == min(machine, 2**29)


def test_a_limit_file_reading_max_is_no_limit(tmp_path):
    (tmp_path / "max").write_text("max\n")
    (tmp_path / "n").write_text("12345\n")
    assert limits._read_number(str(tmp_path / "max")) is None
    assert limits._read_number(str(tmp_path / "n")) == 12345
    assert limits._read_number(str(tmp_path / "absent")) is None
