"""Generated-code cache under threads: several threads building the same kernel into
a fresh cache directory at once all succeed and share one module (they used to share
one temp file name per process, and the losers' rename raised FileNotFoundError)."""

import os
import threading

import pytest

pytest.importorskip("triton")

from tileflow.emit import cache  # noqa: E402
from tileflow.suite import KERNELS  # noqa: E402

THREADS, ROUNDS = 8, 10


def _build_all(ir, n=THREADS):
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def work(i):
        barrier.wait()
        try:
            results[i] = cache.load_generated(ir, "triton", variant="_threads")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_threads_build_same_kernel_once(round_, tmp_path, monkeypatch):
    monkeypatch.setenv("TILEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "_MODULES", {})  # nothing imported yet: every thread builds
    k = KERNELS["rms_norm"]
    ir = k.build(k.default_params({"M": 1, "D": 64}))

    results, errors = _build_all(ir)

    assert errors == [], errors
    assert all(m is results[0] for m in results)
    assert callable(results[0].launch)
    files = sorted(os.listdir(tmp_path / "triton"))
    assert len(files) == 1 and files[0].endswith(".py"), files  # no temp file left behind
    assert (tmp_path / "triton" / files[0]).read_text() == cache.generate(ir, "triton")


def test_second_writer_of_same_content_does_not_fail(tmp_path, monkeypatch):
    """Another process (here: a cleared module table) writing the same text again."""
    monkeypatch.setenv("TILEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "_MODULES", {})
    k = KERNELS["rms_norm"]
    ir = k.build(k.default_params({"M": 1, "D": 64}))
    first = cache.load_generated(ir, "triton", variant="_threads")
    path = first.__file__
    with open(path, "a") as f:  # a stale / torn file from an older writer is replaced
        f.write("# torn\n")
    monkeypatch.setattr(cache, "_MODULES", {})
    again = cache.load_generated(ir, "triton", variant="_threads")
    assert open(path).read() == cache.generate(ir, "triton")
    assert callable(again.launch)
    assert sorted(os.listdir(tmp_path / "triton")) == [os.path.basename(path)]
