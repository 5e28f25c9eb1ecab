"""The report of a SINDy run: report.md, equations.json/.tex, rollouts, plots and TensorBoard entries.

Reads the job's results; imports ``analysis.sindy`` only (tests/test_import_rules.py).
"""
