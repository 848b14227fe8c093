"""The APO paper's experiments, reproduced offline at CPU scale (see python/reproduce.py)."""
