"""The store's bytes: keys, manifest and neuron record layout (format),
INT8/INT4 quantisation (quant) and the Endor bitmap codec (bitmap). Pure
tensor/byte code: no LMDB, gRPC or Redis."""
