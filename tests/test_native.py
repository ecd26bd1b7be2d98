"""The C builder (kvbaton.models.native): a build is keyed by its source and the shared headers,
so editing a header rebuilds every library that may include it, and a failed build is None."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from kvbaton.models import native

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


def test_a_changed_header_rebuilds_and_the_new_code_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBATON_CACHE_DIR", str(tmp_path / "cache"))
    inc = tmp_path / "inc"
    inc.mkdir()
    monkeypatch.setattr(native, "INCLUDE_DIR", inc)
    src = tmp_path / "answer.c"
    src.write_text('#include "answer.h"\nint answer(void) { return ANSWER; }\n')
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None
    results = []
    for value in (41, 42):
        (inc / "answer.h").write_text(f"#define ANSWER {value}\n")
        out = native.build(src, cc, native.CFLAGS)
        assert out is not None and out.exists()
        results.append((out, ctypes.CDLL(str(out)).answer()))
    (first, a), (second, b) = results
    assert first != second and (a, b) == (41, 42)
    # Unchanged inputs reuse the cached build.
    assert native.build(src, cc, native.CFLAGS) == second


def test_a_source_that_does_not_compile_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBATON_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "broken.c"
    src.write_text("int broken(void) { return }\n")
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None
    assert native.build(src, cc, native.CFLAGS) is None
    assert not list((tmp_path / "cache" / "kernels").glob("broken-*.so"))
