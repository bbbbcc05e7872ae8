"""Manifest + store fuzzer of the two bundle readers (issue 15): see :mod:`run` for how to use it.

- :mod:`mutate`: seeded structured mutations of small synthetic bundles; a case is ``(seed, index)``.
- :mod:`worker`: the Python reader (``Bundle.open``) and the ONNX Runtime C-host path, one case at a time.
- :mod:`known`: the disagreements of the two validators that are known (empty it when the readers agree).
- :mod:`run`: the driver (``python -m tests.fuzz.run``, ``make fuzz``).
"""
