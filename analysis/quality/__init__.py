"""Sample quality: FD-MNIST features and scoring (scoring.py); ``python -m analysis.quality`` is its CLI.

Imports nothing else of ``analysis`` (tests/test_import_rules.py).
"""
