"""The Ray SINDy job: plan and checks, stages, trajectories, block statistics and fit tasks, views, the
coordinate choice and validation. It writes the run folder; analysis/sindy_job.py is its entry point.

Imports ``analysis.sindy``, ``analysis.report`` and ``analysis.quality`` (tests/test_import_rules.py).
"""
