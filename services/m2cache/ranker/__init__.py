"""Ranker: low-rank activation predictors, importance ranking into precision
bands (FULL / INT8 / INT4 / skipped), the offline band-ratio search, and the
Ranker gRPC service. In-process use: :class:`m2cache.ranker.ranking.Ranker`."""
