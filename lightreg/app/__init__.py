"""The Hydra app behind ``lightreg-train``: data, models, config plumbing and experiment tracking.

This subpackage may import hydra and wandb; the core ``lightreg`` modules never do.
"""
