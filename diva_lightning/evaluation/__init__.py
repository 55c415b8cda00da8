"""Evaluation on the synthetic shapes world: a programmatic detector, caption parsing, scores, and
decoding (captions, caption likelihoods, MaskGIT image generation) through the adapter contract."""
