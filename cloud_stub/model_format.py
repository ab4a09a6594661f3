"""What a model file is, from its first bytes: pickles and training checkpoints are refused
before anything parses them, with what to publish instead.

A pickle is code: unpickling runs whatever callables the file names (``torch.load`` of an
untrusted checkpoint is remote code execution), so neither ``edge-cloud`` nor a device ever
loads one. ``torch.save`` writes a zip holding ``<name>/data.pkl`` (since PyTorch 1.6) or a
bare pickle (older, ``_use_new_zipfile_serialization=False``); joblib, scikit-learn and plain
``pickle.dump`` write bare pickles, whose first byte is the PROTO opcode 0x80 (protocols 2-5).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from cloud_stub.repo import RepositoryError

PICKLE_PROTO = 0x80
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
TFLITE_IDENTIFIER = b"TFL3"
MAX_ZIP_MEMBERS = 100_000  # a zip's directory is read to look for data.pkl; bounded

_EXPORT = (
    "export the model instead: PyTorch with torch.onnx.export to .onnx, TensorFlow/Keras with "
    "tf.lite.TFLiteConverter to .tflite (docs/models.md), and publish that file"
)


def kind_of(head: bytes, names: list[str] | None = None) -> str | None:
    """What an unpublishable file is, from its first bytes (and a zip's member names), or None.

    Pure: ``head`` is the file's first bytes, ``names`` its members when it is a zip.
    """
    if head[4:8] == TFLITE_IDENTIFIER:
        return None  # a flatbuffer's root offset may begin with any byte, 0x80 included
    if head[:1] == bytes([PICKLE_PROTO]) and len(head) > 1 and 2 <= head[1] <= 5:
        return f"a Python pickle (protocol {head[1]}; what torch.save, joblib and pickle write)"
    if head.startswith(HDF5_MAGIC):
        return "a Keras/HDF5 checkpoint (model.save('….h5'))"
    if head.startswith(ZIP_MAGIC) and names is not None:
        if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            return "a torch.save checkpoint (a zip holding data.pkl, a Python pickle)"
        if any(name.endswith(".pkl") for name in names):
            return "a zip holding a Python pickle"
    return None


def refuse_unsafe(path: Path) -> None:
    """Refuse a pickle, a torch.save checkpoint or a Keras .h5 file, saying why and what to do.

    Raises:
        RepositoryError: ``path`` is one of those.
    """
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read the model file: {exc.strerror}") from None
    names = None
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError):
            infos = []
        names = [info.filename for info in infos[:MAX_ZIP_MEMBERS]]
    kind = kind_of(head, names)
    if kind is None:
        return
    why = (
        "a pickle is code: loading it runs whatever the file says, so edge-agent never "
        "publishes or loads one"
        if "pickle" in kind
        else "devices run ONNX Runtime or LiteRT models, not training checkpoints"
    )
    raise RepositoryError(f"{path} is {kind}; {why}. Not published: {_EXPORT}")
