"""The ``tune-moe`` command line tool: ``ls`` and ``cp`` for the packaged configs, ``plot`` for run logs."""
