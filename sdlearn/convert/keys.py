"""State-dict key renaming between sdlearn and diffusers / transformers, both ways, from one list of pairs.

Every converter lists its renames as RENAMES, (ours, theirs) pairs of name pieces, and renames with `rename`:

    RENAMES = [
        ("down.{i}.resample.", "down_blocks.{i}.downsamplers.0."),   # specific ...
        ("down.", "down_blocks."),                                    # ... before general
        (".shortcut.", ".conv_shortcut."),
    ]
    ours_state = rename(theirs.state_dict(), RENAMES, to="ours")
    theirs_state = rename(ours.state_dict(), RENAMES, to="theirs")

A piece is one or more whole names of a dotted key, ending with ".". Without a leading "." it matches at the
start of a key; with one, after any "." inside it. `{name}` stands for one name without dots (`{i}`, `{j}`: a
level or layer index), copied to the other side. A key is read once, left to right: at each place the first pair
in the list whose piece matches there renames that part, and renamed text is not read again (so list specific
pieces before general ones, on both sides). Keys no piece matches keep their names.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

V = TypeVar("V")
SIDES = ("ours", "theirs")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _pattern(piece: str, k: int) -> str:
    """The regex of a piece: placeholders become named groups _<k>_<name>."""
    inside = piece.startswith(".")
    body = piece[1:] if inside else piece
    parts, end = [], 0
    for m in _PLACEHOLDER.finditer(body):
        parts += [re.escape(body[end:m.start()]), f"(?P<_{k}_{m.group(1)}>[^.]+)"]
        end = m.end()
    parts.append(re.escape(body[end:]))
    return ("(?<=\\.)" if inside else "^") + "".join(parts)


def _check(pair) -> None:
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
        raise ValueError(f"a rename is an (ours, theirs) pair of strings, got {pair!r}")
    ours, theirs = pair
    for piece in pair:
        names = _PLACEHOLDER.findall(piece)
        if not piece.strip(".") or not piece.endswith("."):
            raise ValueError(f"rename {pair}: {piece!r} should be whole names ending with '.'")
        if len(set(names)) != len(names):
            raise ValueError(f"rename {pair}: a placeholder appears twice in {piece!r}")
    if ours.startswith(".") != theirs.startswith("."):
        raise ValueError(f"rename {pair}: both pieces or neither should start with '.' (inside a key / its start)")
    if set(_PLACEHOLDER.findall(ours)) != set(_PLACEHOLDER.findall(theirs)):
        raise ValueError(f"rename {pair}: both pieces should have the same placeholders")


@functools.lru_cache(maxsize=64)
def _compile(pairs: tuple[tuple[str, str], ...], to: str):
    """A function renaming one key to side `to`: one regex, the pieces of that side as ordered alternatives."""
    if to not in SIDES:
        raise ValueError(f"to should be 'ours' or 'theirs', got {to!r}")
    for pair in pairs:
        _check(pair)
    if not pairs:
        return lambda key: key
    src, dst = (1, 0) if to == "ours" else (0, 1)
    regex = re.compile("|".join(f"(?P<_{k}>{_pattern(p[src], k)})" for k, p in enumerate(pairs)))
    targets = [p[dst].removeprefix(".") for p in pairs]

    def replace(m: re.Match) -> str:
        k = int(m.lastgroup[1:])  # the outer group of the alternative that matched closes last
        return _PLACEHOLDER.sub(lambda name: m.group(f"_{k}_{name.group(1)}"), targets[k])

    return functools.partial(regex.sub, replace)


def _renamer(pairs: Iterable[tuple[str, str]], to: str):
    return _compile(tuple(tuple(p) if isinstance(p, list) else p for p in pairs), to)


def rename_key(key: str, pairs: Iterable[tuple[str, str]], to: str) -> str:
    """`key` named the way of side `to` ("ours" or "theirs"), by the (ours, theirs) `pairs`."""
    return _renamer(pairs, to)(key)


def rename(state: Mapping[str, V], pairs: Iterable[tuple[str, str]], to: str) -> dict[str, V]:
    """`state` (a state dict) with its keys named the way of side `to` ("ours" or "theirs"); values unchanged."""
    renamed = _renamer(pairs, to)
    out: dict[str, V] = {}
    source: dict[str, str] = {}
    for key, value in state.items():
        new = renamed(key)
        if new in out:
            raise ValueError(f"renaming to {to}: {source[new]!r} and {key!r} both become {new!r}; check the renames")
        out[new], source[new] = value, key
    return out
