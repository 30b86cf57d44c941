"""The GPU kit: one command that proves the project on a CUDA machine (``make gpu``).

    PYTHONPATH=. python3 -m benchmarks.gpu [--budget 540] [--out DIR] [--dry-run]

See :mod:`benchmarks.gpu.kit` for the plan; ``environment``, ``smoke`` and ``launch_all``
are its steps' scripts, ``pytest_progress`` the plugin that records the test step.
"""
