"""Rules files: the same rules as the flags, in TOML, for scenarios that are run again and again.

A rules file is one flat TOML table whose keys are the long names of the rule flags, with ``-``
or ``_`` (``path-include`` or ``path_include``). A repeatable flag takes a list (or one value),
``redact`` a boolean, ``limit`` an integer, every other key a string (``status`` and ``sample``
also take numbers: ``status = [200, 404]``, ``sample = 10`` for 10 %)::

    # checkout.toml
    method = ["POST", "PUT"]
    path-include = '^/api/checkout'
    status = "2xx"
    set-header = ["X-Shadow: 1"]
    rewrite-path = '^/v1/:/v2/'
    redact = true
    redact-field = ["password", "card_number"]

Flags given beside ``--rules`` add to the file: repeatable ones append their values, the others
replace the file's. An unknown key, a nested table or a value of the wrong type is one line naming
the key and the file (``UsageError``); what the value means is checked by the rule itself.
"""

from __future__ import annotations

import tomllib

from replay.errors import UsageError
from replay.rules.options import BY_KEY, FLAG, INT, Setting, normal_key


NUMBERS_OK = {"status", "status-exclude", "sample"}


def load(path: str) -> list:
    """The settings of the rules file at ``path``."""
    return settings_from_table(read_toml(path), path)


def read_toml(path: str) -> dict:
    """The TOML table of a rules file; any fault is one ``UsageError`` naming the file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such rules file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a rules file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {(e.strerror or str(e)).lower()}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a TOML file (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and tables
        raise UsageError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    return data


def settings_from_table(data: dict, origin: str) -> list:
    out = []
    for raw_key, value in data.items():
        if raw_key == "report" and isinstance(value, dict):
            continue        # the [report] table is `replay report`'s (replay/cli/report.py)
        key = normal_key(raw_key)
        opt = BY_KEY.get(key)
        if opt is None:
            hint = _close(key)
            raise UsageError(f"{origin}: unknown key '{raw_key}'"
                             + (f" (did you mean '{hint}'?)" if hint else ""))
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not opt.multiple:
            raise UsageError(f"{origin}: '{raw_key}' takes one value, not a list")
        for v in values:
            if opt.kind == FLAG:
                ok = isinstance(v, bool)
                want = "true or false"
            elif opt.kind == INT:
                ok = isinstance(v, int) and not isinstance(v, bool)
                want = "an integer"
            elif key in NUMBERS_OK and isinstance(v, (int, float)) and not isinstance(v, bool):
                v = str(v)      # status = 404, sample = 10 (percent)
                ok = True
            else:
                ok = isinstance(v, str)
                want = "a string" + (" or a list of strings" if opt.multiple else "")
            if not ok:
                raise UsageError(f"{origin}: '{raw_key}' must be {want}, not {_tname(v)}")
            out.append(Setting(key, v, origin))
    return out


def merge(file_settings: list, flag_settings: list) -> list:
    """File settings, then flags: a single-valued flag replaces the file's value."""
    given = {s.key for s in flag_settings if not BY_KEY[s.key].multiple}
    return [s for s in file_settings if s.key not in given] + list(flag_settings)


def _tname(v) -> str:
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, list):
        return "a list"
    return type(v).__name__


def _close(key: str):
    import difflib

    m = difflib.get_close_matches(key, list(BY_KEY), n=1, cutoff=0.75)
    return m[0] if m else None
