"""JSON text of OIP bodies, as ``json.dumps(doc, separators=(",", ":"))`` and ``json.loads``
give it, without the standard library's Python steps around its C encoder and scanner.

Two things Python's ``json`` reads are not what they seem, so they are marked for the codec to
refuse precisely, naming the tensor (``jsondata``): the bare tokens ``NaN``, ``Infinity`` and
``-Infinity`` (not JSON; Python's json and Triton write them) become ``Constant`` floats, and
an integer longer than ``int()`` converts (``sys.get_int_max_str_digits``) a ``LongInt``.
"""

from __future__ import annotations

import json
import math
import sys
from _json import make_encoder  # what JSONEncoder.encode builds for each call
from json.encoder import encode_basestring_ascii
from typing import Any


class Constant(float):
    """A float read from a bare ``NaN``/``Infinity``/``-Infinity`` token: its own class, so an
    error can say the token was not JSON rather than that a number overflowed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NaN" if math.isnan(self) else ("Infinity" if self > 0 else "-Infinity")


class LongInt:
    """An integer literal longer than ``int()`` converts: a marker, never a number."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


_CONSTANTS = {name: Constant(name) for name in ("NaN", "Infinity", "-Infinity")}

# Made once, not per call as json.dumps with separators does (``dumps`` takes the encoder's
# ``default``: the error for a value JSON cannot hold).
_ENCODER = json.JSONEncoder(separators=(",", ":"))
# The scanner calls ``parse_constant`` for the tokens only: numbers keep the C fast path.
_DECODER = json.JSONDecoder(parse_constant=_CONSTANTS.__getitem__)


def dumps(doc: dict[str, Any]) -> str:
    """``json.dumps(doc, separators=(",", ":"), allow_nan=False)``: the C encoder
    JSONEncoder.encode would make (circular references checked, ASCII), called without its
    Python steps (they cost as much as encoding a small answer's header).

    Raises:
        ValueError: ``doc`` holds a NaN or infinite float, which JSON has no way to write
            (tensors spell them as strings before they get here: ``jsondata.to_json``).
    """
    encode = make_encoder(
        {}, _ENCODER.default, encode_basestring_ascii, None, ":", ",", False, False, False
    )
    return "".join(encode(doc, 0))


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``, with the tokens and over-long integers marked (module docstring).

    A str document that fills ``text`` exactly is decoded by the decoder's ``raw_decode``
    (json.loads' own steps are a third of a small header's decoding); anything else
    (surrounding whitespace, extra data, an error) by its ``decode``, as json.loads does, for
    its result and its error messages; bytes are decoded first as json.loads would (UTF-8,
    UTF-16 or UTF-32, detected).

    Raises:
        ValueError: not JSON (``json.JSONDecodeError``), or bytes in no encoding JSON allows.
    """
    if isinstance(text, str):
        try:
            value, end = _DECODER.raw_decode(text)
        except ValueError:
            end = -1
        if end == len(text):
            return value
    else:
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    try:
        return _DECODER.decode(text)
    except ValueError as exc:
        # int()'s own refusal ("use sys.set_int_max_str_digits()") names no tensor: read the
        # document again with such integers marked, for the codec to name where they are.
        if "integer string conversion" not in str(exc):
            raise
    return _MARKING_DECODER.decode(text)


def _int(literal: str) -> int | LongInt:
    limit = sys.get_int_max_str_digits()
    digits = len(literal) - literal.startswith("-")
    return LongInt(digits) if limit and digits > limit else int(literal)


# (``parse_int`` set, the scanner calls it for every integer: kept for the rare document that
# needs it.)
_MARKING_DECODER = json.JSONDecoder(parse_constant=_CONSTANTS.__getitem__, parse_int=_int)
