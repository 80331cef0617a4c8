"""The native status codes are named once: csrc/zc_format.h's `enum zc_status`, its
Python twin `zcore.errors.Status`, the `.pxd` that declares them to Cython and the
status -> exception table must agree name for name and value for value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zcore.errors import STATUS_ERRORS, STATUS_TEXT, Status, ZcoreError, status_error

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def header_statuses() -> dict[str, int]:
    """`ZC_OK` and every `ZC_E_*` of `enum zc_status` in zc_format.h, with its value."""
    text = (CSRC / "zc_format.h").read_text()
    body = re.search(r"enum\s+zc_status\s*\{(.*?)\};", text, re.S)
    assert body, "zc_format.h has no `enum zc_status { ... };`"
    code = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    found = dict(
        (name, int(value))
        for name, value in re.findall(r"\b(ZC_(?:OK|E_\w+))\s*=\s*\(?\s*(-?\d+)\s*\)?", code)
    )
    assert "ZC_OK" in found and len(found) > 1, f"could not parse zc_status: {code!r}"
    return found


def test_status_enum_mirrors_every_code_of_zc_format_h() -> None:
    c_codes = header_statuses()
    py_codes = {("ZC_OK" if m is Status.OK else f"ZC_E_{m.name}"): m.value for m in Status}
    assert py_codes == c_codes


def test_every_failure_status_has_an_exception_and_a_text() -> None:
    failures = {m for m in Status if m is not Status.OK}
    assert set(STATUS_ERRORS) == failures
    assert set(STATUS_TEXT) == failures
    for status in failures:
        exc = status_error(status, "doing")
        assert type(exc) is STATUS_ERRORS[status]
        assert str(exc) == f"doing: {STATUS_TEXT[status]}"
        assert isinstance(exc, ZcoreError)


def test_status_error_of_an_unknown_code_is_a_plain_zcore_error() -> None:
    exc = status_error(-99, "doing")
    assert type(exc) is ZcoreError and "-99" in str(exc)


def test_no_status_code_is_defined_outside_zc_format_h() -> None:
    outside = {
        h.name: re.findall(r"#define\s+(ZC_E_\w+)", h.read_text())
        for h in CSRC.glob("*.h")
        if h.name != "zc_format.h"
    }
    assert not any(outside.values()), outside


def test_pxd_declares_every_status_code() -> None:
    pxd = (ROOT / "zcore" / "_native" / "zc.pxd").read_text()
    declared = set(re.findall(r"^\s+(ZC_(?:OK|E_\w+))\s*$", pxd, re.M))
    assert declared == set(header_statuses())


@pytest.mark.parametrize("pyx", sorted((ROOT / "zcore" / "_native").glob("*.pyx")),
                         ids=lambda p: p.name)
def test_pyx_files_compare_statuses_by_name_not_number(pyx: Path) -> None:
    bare = [
        (n, line.strip())
        for n, line in enumerate(pyx.read_text().splitlines(), 1)
        if re.search(r"(?:\b(?:st|seq|status)\s*[!=]=\s*|status_error\(\s*|\bst\s*=\s*)-\d", line)
        or re.search(r"\belse\s+-\d", line)
    ]
    assert not bare, f"{pyx.name}: status codes as bare numbers: {bare}"

