"""Evaluation: CORE-style tasks scored per exit (core.py), every mode's speed (speed.py), the capability report
(report.py)."""
