"""Benchmark suites: one module per suite, named after it (bench/harness.py finds them).

A suite module defines `DESCRIPTION` (one line) and `run(ctx: benchkit.Context)`, which
returns or yields `benchkit.Metric`s, each with a baseline measured in the same run.
Put every measured size and count behind a named module-level constant with a comment
saying why it has that value; size them with `ctx.scale` so --quick shrinks them.
"""
