"""Evaluation: CORE-style tasks scored per exit (core.py), the capability report (report.py)."""
