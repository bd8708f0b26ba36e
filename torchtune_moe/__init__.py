"""torchtune-moe: Mixture-of-Experts fine-tuning the torchtune way."""

__version__ = "0.1.0"
