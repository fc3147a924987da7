"""The GRPO run: the driver's loop and everything it carries between steps (typed step data,
scoring, metrics, tracking, checkpoints, the held-out check) and the run's inputs (training/jobs.py)."""
