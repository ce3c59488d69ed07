"""The ranker's offline library: predictor kinds (which neurons matter for this
token), calibration collection, training, evaluation (recall, stepwise
perplexity), importance ranking into precision bands, the band-ratio search and
predictor/policy storage in the model's store. Plain torch + LMDB, no grpc; the
Ranker gRPC service (m2cache.ranker) and the worker build on it.
In-process use: :class:`m2cache.predictors.ranking.Ranker`."""
