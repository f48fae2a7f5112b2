"""Evaluation: bits per byte per stage exit (bpb.py)."""
