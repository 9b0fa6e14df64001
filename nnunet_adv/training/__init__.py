"""Training-side pieces shared by the trainers in ``trainers/`` (these import nnU-Net)."""
