"""Communication primitives below the roles: where an actor runs and the environment of its
rank (nodes.py), moving weights between processes over a process group (transport.py) or a
shared-memory file on one node (shm_weights.py). Imports no role and no Ray pool; the roles
(rollout/, learner/, rewards/) and the runtime (cluster/) build on it."""
