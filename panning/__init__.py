"""panning: pruning neural networks before training with combined, scheduled saliency indices."""

__version__ = "0.2.0"
