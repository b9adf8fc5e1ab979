"""ONNX files on disk: paths checked before any expensive work, and models written
(with their ``<name>.data`` weights) under temp names in the destination folder,
renamed in place only once everything is written, so ``dst == src`` works and a
failure leaves nothing behind and loses nothing."""

from __future__ import annotations

import os
import shutil
import tempfile


def _fspath(path, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what} is empty: give an .onnx file path")
    return path


def check_source(path, what: str) -> str:
    """``path`` as a str, if it is an existing file."""
    path = _fspath(path, what)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder, not an ONNX file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    return path


def check_destination(path, what: str) -> str:
    """``path`` as a str, if a model and its ``.data`` file can be written there."""
    path = _fspath(path, what)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder: give a file name in it, "
                                f"e.g. {os.path.join(path, 'model.onnx')!r}")
    if os.path.isdir(path + ".data"):
        raise IsADirectoryError(f"{what} {path!r}: its weights file {path + '.data'!r} is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise FileNotFoundError(f"{what} {path!r}: folder {folder!r} does not exist (create it first)")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{what} {path!r}: {folder!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path!r}: folder {folder!r} is not writable")
    return path


def data_name(path: str) -> str:
    """The external-data file name of the model at ``path`` (relative to its folder)."""
    return os.path.basename(path) + ".data"


class Staged:
    """``with Staged() as s: save(model, s.path(dst)); ...; s.commit()``: each model is
    saved in a fresh temp folder beside ``dst`` under ``dst``'s own name (so the
    external-data location recorded in it stays ``<name>.data``); :meth:`commit` moves
    the weights then the model in place; leaving the block without commit removes them."""

    def __init__(self):
        self._items: list = []  # (temp folder, destination)

    def path(self, dst: str) -> str:
        folder = os.path.dirname(os.path.abspath(dst))
        name = os.path.basename(dst)
        tmp = tempfile.mkdtemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        self._items.append((tmp, dst))
        return os.path.join(tmp, name)

    def commit(self) -> None:
        for tmp, dst in self._items:
            name, folder = os.path.basename(dst), os.path.dirname(os.path.abspath(dst))
            data = os.path.join(tmp, data_name(dst))
            if os.path.exists(data):
                os.replace(data, os.path.join(folder, data_name(dst)))
            elif os.path.exists(os.path.join(folder, data_name(dst))):
                os.remove(os.path.join(folder, data_name(dst)))  # stale: the new model has no external data
            os.replace(os.path.join(tmp, name), dst)
            shutil.rmtree(tmp, ignore_errors=True)
        self._items.clear()

    def discard(self) -> None:
        for tmp, _ in self._items:
            shutil.rmtree(tmp, ignore_errors=True)
        self._items.clear()

    def __enter__(self) -> "Staged":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
