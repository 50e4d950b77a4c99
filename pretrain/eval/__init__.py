"""Evaluation: synthetic recall tasks (tasks.py) shared by bench/recall.py and the evaluation command."""
