"""The commands a user runs (`realsr-r1 ...`, app/cli.py): train, SFT, data preparation, job
submission, infer and eval."""
