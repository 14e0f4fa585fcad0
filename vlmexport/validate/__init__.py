"""Measuring a bundle against the PyTorch model."""
