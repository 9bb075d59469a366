"""Sweeps: search spaces as data (space.py), budget-filtered Optuna search inside Ray Tune with
early stopping: sweep.py runs one (searchers.py, trainable.py, callbacks.py, schedulers.py,
results.py); promote.py takes its winner on."""
