"""Command-line entry points (nnU-Net style)."""
