"""Data pipeline: split loading, RDKit featurisation, tokenisation and batching."""
