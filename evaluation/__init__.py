"""Inference and evaluation: super-resolve images with a checkpoint, score test sets.

A consumer of the roles (like cluster/): it uses the rollout engines to generate, the VQ
tokenizer and trace parser from vlcot/, and the text rewards from rewards/ to grade the
chain of thought. Nothing in the roles imports it.
"""
