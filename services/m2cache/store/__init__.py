"""NeuronStore gRPC service: the SSD tier, a root directory of LMDB stores."""
