"""Evaluation: distance metrics, evaluating a model on labelled photos, comparing systems photo for photo,
out-of-fold cross-fitting, and the published benchmark sets.
"""
