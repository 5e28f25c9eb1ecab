"""The SINDy engine: candidate terms and families, the library, Gram statistics, optimizers, selection,
metrics, targets, coordinates, theory, the mixture family, integration and the pysindy export.

Plain records in, results out: numpy, torch, scipy, scikit-learn and pysindy only. No Ray, no run folders,
no ``configs.schema``, no file writes, and nothing else of ``analysis`` (tests/test_import_rules.py).
"""
