"""Evaluation: the eval loop (`loop`) and the reports built from its results (`report`)."""
