"""Evaluation (`python -m pretrain.evaluate`, docs/evaluation.md): recall tasks (tasks.py) shared with
bench/recall.py, perplexity by length and position, S-NIAH sweeps, learning on/off."""
