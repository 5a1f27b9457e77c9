"""Training: feature caches, the heads on cached features, end-to-end fine-tuning, positives for the contrastive
loss, and resumable checkpoints.
"""
