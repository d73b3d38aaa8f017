"""The jobs layer: what runs around the engine for a scan, a cohort or an evaluation.

- :mod:`.cases` — the one place where a path, a folder or a CSV becomes a list of cases (ids are
  safe path components, unique by construction).
- :mod:`.runner` — one case: read, preprocess, explain, write the case folder atomically.
- :mod:`.cohort` — many cases, resumable, across processes (``torchrun``).
- :mod:`.evaluate` — localization, faithfulness and sanity metrics over a cohort, with a report.
- :mod:`.report` — tables and pictures.

Imports go one way: ``cli``/``napari`` → ``jobs`` → ``metrics`` → ``heatmap``/``io``/``masks`` →
``space``; the engine imports nothing from here.
"""
