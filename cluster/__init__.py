"""The Ray runtime and the config root: the run's Config and its validation (config.py), the
Python interpreter of each role (interpreters.py, interpreter_probe.py), actor groups and their placement, the learner
group, the rollout pool (with its weight sync and guidance counters) and the reward pool."""
