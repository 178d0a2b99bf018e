"""Bench suites: one budget, one seed list, one table per suite.

- :mod:`scoredistill.bench.toy`: every generator recipe on the toy GMM teachers;
- :mod:`scoredistill.bench.sds`: every optimize objective on particles under the GMM teachers;
- :mod:`scoredistill.bench.digits`: the bundled image teachers, their real-data floor and one-step students;
- :mod:`scoredistill.bench.tables`: the table writer they share (markdown, CSV, JSON).

``scoredistill bench --suite toy|sds|digits`` is the command line (:mod:`scoredistill.cli.bench`).
"""
