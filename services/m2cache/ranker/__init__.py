"""The Ranker gRPC service: server.py (thin proto <-> domain layer), config.py,
catalog.py (the rankers of every store under a root, training jobs). The
predictor library it serves lives in :mod:`m2cache.predictors`."""
