"""Are two result files the same run? ``python -m bench.same_results BEFORE.h5 AFTER.h5``.

Compares every dataset and attribute of two result files, except what a machine cannot repeat:
timing columns (names ending ``_s``), memory and energy readings (``rss``, ``peak_``, ``gpu_``,
``energy``, ``cpu_percent``, ``disk_write``), the sampled ``/series`` and the ``/provenance``
group (dates, versions, git commit). The stored config is compared as parsed TOML, not as text.
Exit 0 when all compared values are equal (bit for bit: floats too), else 1, with each
difference named. ``--allow-new`` accepts datasets or attributes only the second file has (a
feature that adds a column); ``bench/before_after.sh`` runs it on two versions of the code.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

VOLATILE = re.compile(r"(_s$|rss|peak_|gpu_|energy|cpu_percent|disk_write|^series/|^provenance)")
"""Paths (without the leading slash) whose values depend on the machine and the moment."""


def entries(f: h5py.File) -> Iterator[tuple[str, Any]]:
    """Every dataset (``path``) and attribute (``path@name``) of a file with its value."""
    for name, value in f.attrs.items():
        yield f"@{name}", value
    found: list[tuple[str, Any]] = []

    def visit(path: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append((path, obj[()]))
        for name, value in obj.attrs.items():
            found.append((f"{path}@{name}", value))

    f.visititems(visit)
    yield from found


def equal(a: Any, b: Any) -> bool:
    """Equal values: arrays element by element (NaN equals NaN), TOML texts as parsed."""
    if isinstance(a, bytes):
        a = a.decode()
    if isinstance(b, bytes):
        b = b.decode()
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def compare(before: str, after: str, *, allow_new: bool = False) -> list[str]:
    """The differences between two result files, one line each (empty: the same run)."""
    with h5py.File(before, "r") as fa, h5py.File(after, "r") as fb:
        a = {k: v for k, v in entries(fa) if not VOLATILE.search(k)}
        b = {k: v for k, v in entries(fb) if not VOLATILE.search(k)}
    out = [f"only in {before}: {k}" for k in sorted(a.keys() - b.keys())]
    if not allow_new:
        out += [f"only in {after}: {k}" for k in sorted(b.keys() - a.keys())]
    for key in sorted(a.keys() & b.keys()):
        va, vb = a[key], b[key]
        if key == "@config_toml":
            out += config_differences(va, vb, before, after, allow_new=allow_new)
        elif not equal(va, vb):
            out.append(f"differs: {key}: {_short(va)} != {_short(vb)}")
    return out


def config_differences(
    text_a: str | bytes, text_b: str | bytes, before: str, after: str, *, allow_new: bool
) -> list[str]:
    """The stored configs key by key (``section.key``): a key only the second has is a new
    setting (accepted with ``allow_new``), any other difference is named."""
    a, b = (
        _flat(tomllib.loads(t.decode() if isinstance(t, bytes) else t)) for t in (text_a, text_b)
    )
    out = [f"only in {before}: config {k}" for k in sorted(a.keys() - b.keys())]
    if not allow_new:
        out += [f"only in {after}: config {k} = {b[k]!r}" for k in sorted(b.keys() - a.keys())]
    out += [
        f"differs: config {k}: {a[k]!r} != {b[k]!r}"
        for k in sorted(a.keys() & b.keys())
        if a[k] != b[k]
    ]
    return out


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v: Any) -> str:
    text = repr(v.tolist() if isinstance(v, np.ndarray) else v)
    return text if len(text) <= 120 else text[:117] + "..."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--allow-new", action="store_true", help="accept entries only AFTER has")
    args = p.parse_args(argv)
    diffs = compare(args.before, args.after, allow_new=args.allow_new)
    for line in diffs:
        print(line)
    verdict = "the same run" if not diffs else f"{len(diffs)} difference(s)"
    print(f"{args.before} vs {args.after}: {verdict} (timing, memory, series, provenance aside)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
