"""JSON text of OIP bodies, as ``json.dumps(doc, separators=(",", ":"))`` and ``json.loads``
give it, without the standard library's Python steps around its C encoder and scanner."""

from __future__ import annotations

import json
from _json import make_encoder  # what JSONEncoder.encode builds for each call
from json.encoder import encode_basestring_ascii
from typing import Any

# Made once, not per call as json.dumps with separators does (``dumps`` takes the encoder's
# ``default``: the error for a value JSON cannot hold).
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()


def dumps(doc: dict[str, Any]) -> str:
    """``json.dumps(doc, separators=(",", ":"))``: the C encoder JSONEncoder.encode would make
    (circular references checked, NaN allowed, ASCII), called without its Python steps (they
    cost as much as encoding a small answer's header)."""
    encode = make_encoder(
        {}, _ENCODER.default, encode_basestring_ascii, None, ":", ",", False, False, True
    )
    return "".join(encode(doc, 0))


def loads(text: str) -> Any:
    """``json.loads(text)``: a document that fills ``text`` exactly is decoded by the decoder's
    ``raw_decode`` (json.loads' own steps are a third of a small header's decoding); anything
    else (surrounding whitespace, extra data, an error) goes through json.loads, for its
    result and its error messages."""
    try:
        value, end = _DECODER.raw_decode(text)
    except ValueError:
        end = -1
    return value if end == len(text) else json.loads(text)
