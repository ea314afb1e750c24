"""The one JSON loader for every JSON file we read: bounded, and one :class:`InputError` line on failure.

Used for safetensors headers, shard indexes, ``adapter_config.json``, ``trainer_state.json`` and
``run.json``. Bounds (a hostile or broken file costs at most this much, then is refused):

- size: at most ``max_bytes`` bytes (default :data:`MAX_JSON_BYTES`), checked before reading;
- integers: at most :data:`MAX_INT_DIGITS` digits (a 5000-digit integer would otherwise cost
  quadratic time to convert, or raise ``ValueError``);
- nesting: refused beyond the interpreter's recursion limit (``RecursionError`` becomes one line);
  the values we use are type-checked by their readers, so nothing recurses into them later.

Time is linear in the text's length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dora_analysis.collector import paused_collector
from dora_analysis.errors import InputError, first_line

__all__ = [
    "MAX_INT_DIGITS",
    "MAX_JSON_BYTES",
    "MAX_CONFIG_BYTES",
    "parse_json",
    "read_json",
    "read_json_object",
    "json_field",
]

MAX_INT_DIGITS = 20  # every int64/uint64 fits; nothing we read needs more
MAX_JSON_BYTES = 100 * 1024 * 1024  # safetensors' own header limit; configs are far smaller
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a model's config.json (a few KB; large label maps fit)


# A run of more digits than the bound, found as a run of zeros once every digit reads 0 (JSON's
# digits are ASCII only): a translate and a substring search, ten times faster than a regex on a
# header of megabytes.
_DIGITS_AS_ZERO = str.maketrans("123456789", "000000000")
_LONG_RUN = "0" * (MAX_INT_DIGITS + 1)


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooLong(len(text))
    return int(text)


class _TooLong(ValueError):
    pass


def parse_json(path: Path | str, raw: bytes | str, what: str = "JSON") -> object:
    """``raw`` (the text of ``path``) parsed within the bounds above; :class:`InputError` naming ``path``.

    ``what`` names the file's role in messages (``"safetensors header"``, ``"adapter config"``).
    """
    try:
        if isinstance(raw, bytes | bytearray):  # as json.loads decodes it (UTF-8, -16 or -32)
            raw = raw.decode(json.detect_encoding(raw), "surrogatepass")
        with paused_collector():
            if _LONG_RUN not in raw.translate(_DIGITS_AS_ZERO):
                # no run of more digits than the bound anywhere, so no integer can exceed it: the C
                # parser converts every integer itself (a hook per integer cost a large header's time)
                return json.loads(raw)
            return json.loads(raw, parse_int=_parse_int)
    except _TooLong as e:
        raise InputError.of(
            path, f"{what} holds an integer of {e.args[0]} digits (at most {MAX_INT_DIGITS} are read)"
        ) from None
    except RecursionError:
        raise InputError.of(path, f"{what} is nested too deeply to read") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise InputError.of(path, f"{what} is not valid JSON ({first_line(e)})") from None


def read_json(path: Path | str, what: str = "JSON", *, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The JSON value in the file ``path``; :class:`InputError` when unreadable, too large or malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError.of(path, f"{what} cannot be read ({e.strerror or type(e).__name__})") from None
    if len(raw) > max_bytes:
        raise InputError.of(path, f"{what} is larger than {max_bytes} bytes; refusing to parse it")
    return parse_json(path, raw, what)


def read_json_object(path: Path | str, what: str = "JSON", *, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """:func:`read_json` for a file that must hold a JSON object."""
    value = read_json(path, what, max_bytes=max_bytes)
    if not isinstance(value, dict):
        raise InputError.of(path, f"{what} is not a JSON object")
    return value


_JSON_TYPES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def json_field(path: Path | str, record: dict, key: str, expected: type, *, required: bool = False) -> Any:
    """``record[key]`` checked to be of the JSON type ``expected`` (None when absent and not ``required``).

    ``float`` accepts integers too; ``int`` and ``float`` refuse booleans (JSON ``true`` is not 1).
    Raises :class:`InputError`, one line naming the file and the field, for a missing or mistyped value.
    """
    value = record.get(key)
    if value is None:
        if required:
            raise InputError.of(path, f"has no {key!r} field (expected {_JSON_TYPES[expected]})")
        return None
    accepted = (int, float) if expected is float else expected
    if isinstance(value, accepted) and not (expected in (int, float) and isinstance(value, bool)):
        return float(value) if expected is float else value
    shown = json.dumps(value)[:40] if not isinstance(value, (dict, list)) else type(value).__name__
    raise InputError.of(path, f"field {key!r} is {shown}; expected {_JSON_TYPES[expected]}")
