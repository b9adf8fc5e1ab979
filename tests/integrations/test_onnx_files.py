"""tileflow.onnx misuse: paths checked before any export work with a one-line error
naming the path, files written under temp names and renamed at the end (optimize in
place keeps the weights, a failed export leaves nothing and loses nothing), and the
Generator refuses graphs and token ids it cannot run."""

import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import tileflow  # noqa: E402

from .test_onnx_decode import PROMPT, _tiny  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    step, prefill = str(d / "step.onnx"), str(d / "prefill.onnx")
    tileflow.onnx.export(_tiny("qwen2"), step, prefill_path=prefill)
    return step, prefill, tileflow.onnx.Generator(step).generate(PROMPT, STEPS)


@pytest.fixture
def no_export(monkeypatch):
    """The path checks must fire before torch.onnx.export runs."""
    def boom(*args, **kwargs):
        raise AssertionError("torch.onnx.export ran before the path was checked")

    monkeypatch.setattr(torch.onnx, "export", boom)


def _copy(src, folder):
    for name in (os.path.basename(src), os.path.basename(src) + ".data"):
        shutil.copy(os.path.join(os.path.dirname(src), name), folder / name)
    return str(folder / os.path.basename(src))


def test_optimize_in_place_keeps_the_weights(exported, tmp_path):
    step, _, ref = exported
    src = _copy(step, tmp_path)
    tileflow.onnx.optimize(src, src, target="ort")
    assert tileflow.onnx.Generator(src).generate(PROMPT, STEPS) == ref
    assert sorted(os.listdir(tmp_path)) == ["step.onnx", "step.onnx.data"]


def test_export_to_missing_folder(tmp_path, no_export):
    with pytest.raises(FileNotFoundError, match=r"folder '.*nope' does not exist"):
        tileflow.onnx.export(_tiny("qwen2"), str(tmp_path / "nope" / "step.onnx"))
    assert os.listdir(tmp_path) == []


def test_export_under_a_file(tmp_path, no_export):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"notes.txt' is not a folder"):
        tileflow.onnx.export(_tiny("qwen2"), str(tmp_path / "notes.txt" / "step.onnx"))
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_export_to_read_only_folder(tmp_path, monkeypatch, no_export):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: stand in for a read-only mount
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(ro)
                            else real(p, mode, **kw))
    try:
        with pytest.raises(PermissionError, match=r"folder '.*ro' is not writable"):
            tileflow.onnx.export(_tiny("qwen2"), str(ro / "step.onnx"))
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_export_to_a_folder_path(tmp_path, no_export):
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(IsADirectoryError, match=r"'.*out.onnx' is a folder"):
        tileflow.onnx.export(_tiny("qwen2"), str(tmp_path / "out.onnx"))
    assert os.listdir(tmp_path) == ["out.onnx"] and os.listdir(tmp_path / "out.onnx") == []


def test_failed_export_leaves_nothing_and_loses_nothing(tmp_path, monkeypatch):
    """The prefill export fails after the step graph was written: neither lands, and
    the files already there are untouched."""
    (tmp_path / "step.onnx").write_text("old step")
    (tmp_path / "step.onnx.data").write_text("old weights")
    real, calls = torch.onnx.export, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("prefill export failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", second_fails)
    with pytest.raises(RuntimeError, match="prefill export failed"):
        tileflow.onnx.export(_tiny("qwen2"), str(tmp_path / "step.onnx"),
                             prefill_path=str(tmp_path / "prefill.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["step.onnx", "step.onnx.data"]
    assert (tmp_path / "step.onnx").read_text() == "old step"
    assert (tmp_path / "step.onnx.data").read_text() == "old weights"


def test_generator_refuses_the_prefill_graph(exported):
    _, prefill, _ = exported
    with pytest.raises(ValueError, match=r"is a tileflow prefill graph, not the decode step"):
        tileflow.onnx.Generator(prefill)
    step = exported[0]
    with pytest.raises(ValueError, match=r"is a tileflow decode-step graph, not a prefill graph"):
        tileflow.onnx.Generator(step, step)


def test_generator_refuses_another_onnx_graph(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "other", [x], [y])
    path = str(tmp_path / "other.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    with pytest.raises(ValueError, match=r"is not a tileflow decode-step model .*inputs \[x\] and outputs \[y\]"):
        tileflow.onnx.Generator(path)


@pytest.mark.parametrize("bad", [[-1, 3], [3, 128]])
def test_generator_token_ids_out_of_vocab(exported, bad):
    step, prefill, _ = exported
    i = 0 if bad[0] == -1 else 1
    for gen in (tileflow.onnx.Generator(step), tileflow.onnx.Generator(step, prefill)):
        with pytest.raises(IndexError, match=rf"token id {bad[i]} at position {i} .* \[0, 128\)"):
            gen.generate(bad, 3)
    with pytest.raises(IndexError):  # as torch does
        torch.nn.Embedding(128, 4)(torch.tensor(bad))


def test_generator_on_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Generator step '.*missing.onnx' does not exist"):
        tileflow.onnx.Generator(str(tmp_path / "missing.onnx"))
