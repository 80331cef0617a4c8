#!/usr/bin/env python3
"""zcore throughput harness: `python bench/harness.py SUITE [--json FILE] [--quick]`.

Runs one suite, prints each metric beside a baseline measured in the same run and their
ratio, checks the ratio against the metric's target, and writes

    {"suite": NAME, "metrics": [{"name", "value", "unit", "baseline", "ratio",
                                 "target", "met", "note", "details"}, ...]}

Suites are the modules of bench/suites/ (a module `bench/suites/capture.py` is the suite
`capture`; a suite too big for one module is a package, `bench/suites/recovery/`, whose
`__init__.py` is the suite).  A suite module defines `DESCRIPTION` (one line) and `run(ctx)`, which
returns or yields `benchkit.Metric`s; `ctx` is a `benchkit.Context` holding the scratch
directory and the --quick flag.  Adding a suite is adding a module: nothing to register.

Scratch files go to a fresh directory under $ZCORE_BENCH_DIR (default /var/tmp), which
must be a real disk, not tmpfs, in full mode; it is removed when the suite ends.
`--quick` divides every size ~100x so tests can smoke-test the harness (its numbers are
then meaningless).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pkgutil
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from benchkit import Context, Metric  # noqa: E402

SUITES_DIR = BENCH_DIR / "suites"
DEFAULT_BENCH_DIR = "/var/tmp"
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}


def available_suites() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules([str(SUITES_DIR)]) if not m.name.startswith("_")
    )


def load_suite(name: str) -> ModuleType:
    names = available_suites()
    if name not in names:
        raise SystemExit(
            f"harness: unknown suite {name!r}; available suites: {', '.join(names) or 'none'}"
        )
    module = importlib.import_module(f"suites.{name}")
    if not callable(getattr(module, "run", None)):
        raise SystemExit(f"harness: suite module {module.__file__} defines no run(ctx)")
    return module


def filesystem_type(path: Path) -> str:
    """Type of the filesystem holding `path`, from /proc/self/mountinfo ("?" if unknown)."""
    target = os.path.realpath(path)
    best, fstype = "", "?"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mount = parts[4].replace("\\040", " ")
                kind = parts[parts.index("-") + 1]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, kind
    except (OSError, ValueError, IndexError):
        return "?"
    return fstype


def bench_root(quick: bool) -> Path:
    root = Path(os.environ.get("ZCORE_BENCH_DIR") or DEFAULT_BENCH_DIR)
    if not root.is_dir():
        raise SystemExit(f"harness: ZCORE_BENCH_DIR={root} is not a directory")
    fstype = filesystem_type(root)
    if fstype in MEMORY_FILESYSTEMS and not quick:
        raise SystemExit(
            f"harness: {root} is on {fstype}, which measures memory, not a disk; point "
            "ZCORE_BENCH_DIR at a directory on the disk under test"
        )
    return root


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"


def format_table(metrics: list[Metric]) -> str:
    header = ("metric", "value", "unit", "baseline", "ratio", "target", "met?")
    rows = [header]
    for m in metrics:
        met = {None: "-", True: "yes", False: "NO"}[m.met]
        rows.append((m.name, _fmt(m.value), m.unit, _fmt(m.baseline), _fmt(m.ratio),
                     m.target or "-", met))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {1, 3, 4}
    lines = []
    for k, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_json(path: Path, suite: str, metrics: list[Metric]) -> None:
    doc = {"suite": suite, "metrics": [m.to_json() for m in metrics]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a zcore benchmark suite; every metric beside a same-run baseline.",
        epilog="suites: " + ", ".join(available_suites()),
    )
    parser.add_argument("suite", nargs="?", help="suite to run (see --list)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report here")
    parser.add_argument("--quick", action="store_true",
                        help="sizes / ~100: a smoke test of the harness, not a measurement")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 3 when a target is missed")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (for debugging)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    if args.list or not args.suite:
        for name in available_suites():
            doc = getattr(load_suite(name), "DESCRIPTION", "")
            print(f"{name:12s} {doc}")
        return 0 if args.list else 2
    module = load_suite(args.suite)
    root = bench_root(args.quick)
    workdir = Path(tempfile.mkdtemp(prefix=f"zcore-bench-{args.suite}-", dir=root))
    ctx = Context(workdir=workdir, quick=args.quick, verbose=not args.quiet)
    mode = "quick (sizes / ~100: not a measurement)" if args.quick else "full"
    print(f"suite {args.suite}: {mode}; scratch {workdir} ({filesystem_type(workdir)})",
          file=sys.stderr, flush=True)

    metrics: list[Metric] = []
    failed = False
    t0 = time.perf_counter()
    try:
        for metric in module.run(ctx) or ():
            metrics.append(metric)
            if not args.quiet:
                print(f"  -> {metric.name} = {_fmt(metric.value)} {metric.unit} "
                      f"(baseline {_fmt(metric.baseline)}, ratio {_fmt(metric.ratio)})",
                      file=sys.stderr, flush=True)
    except Exception:
        failed = True
        traceback.print_exc()
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - t0

    print(format_table(metrics))
    missed = [m.name for m in metrics if m.met is False]
    print(f"\n{args.suite}: {len(metrics)} metrics in {elapsed:.0f} s; "
          + (f"targets missed: {', '.join(missed)}" if missed else "every target met"))
    if args.json:
        write_json(args.json, args.suite, metrics)
    if failed:
        print(f"harness: suite {args.suite} failed (metrics above are the ones it finished)",
              file=sys.stderr)
        return 1
    return 3 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
