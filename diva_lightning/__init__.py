"""diva-lightning: DIVA post-training for unified multimodal models, as Lightning modules."""

__version__ = "0.1.0"
