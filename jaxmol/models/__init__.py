"""Flax Linen models: BERT text tower, GIN/GCN molecule towers, projector, retrieval model."""
