"""Pieces shared by train.py, test.py and the packages: errors, checkpoint reading, CLI helpers."""
