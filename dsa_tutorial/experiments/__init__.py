"""Experiments of chapters 8-9: `python -m dsa_tutorial.experiments NAME`."""
