"""The test helpers for optional extras and shared material: a skip with its reason on a developer's
machine, a failure under CI (CI=true), where .ci/run installs every extra and provides the material."""

from __future__ import annotations

import pytest

from tests.conftest import require_module, shared_file

MISSING_MODULE = "ngpt_no_such_module"
MISSING_VARIABLE = "NGPT_TEST_NO_SUCH_MATERIAL"


@pytest.mark.parametrize("ci", ["", "false", "0"])
def test_missing_extra_or_material_skips_outside_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=f"needs {MISSING_MODULE}"):
        require_module(MISSING_MODULE)
    monkeypatch.delenv(MISSING_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING_VARIABLE} is not set"):
        shared_file(MISSING_VARIABLE)


@pytest.mark.parametrize("ci", ["true", "1", "True"])
def test_missing_extra_or_material_fails_under_ci(monkeypatch, tmp_path, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=f"needs {MISSING_MODULE}.*CI must provide"):
        require_module(MISSING_MODULE)
    monkeypatch.setenv(MISSING_VARIABLE, str(tmp_path / "absent.txt"))
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING_VARIABLE} points at .*absent.txt, which does not"):
        shared_file(MISSING_VARIABLE)


def test_what_is_there_is_returned(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    assert require_module("json").dumps([1]) == "[1]"
    (tmp_path / "input.txt").write_text("x")
    monkeypatch.setenv(MISSING_VARIABLE, str(tmp_path / "input.txt"))
    assert shared_file(MISSING_VARIABLE) == tmp_path / "input.txt"
