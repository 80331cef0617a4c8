"""Benchmark suites: one module per suite, named after it (bench/harness.py finds them);
a suite past ~500 lines is a package whose `__init__.py` is the suite and whose modules are
its parts (bench/suites/recovery/).

A suite module defines `DESCRIPTION` (one line) and `run(ctx: benchkit.Context)`, which
returns or yields `benchkit.Metric`s, each with a baseline measured in the same run.
Put every measured size and count behind a named module-level constant with a comment
saying why it has that value; size them with `ctx.scale` so --quick shrinks them.
"""
