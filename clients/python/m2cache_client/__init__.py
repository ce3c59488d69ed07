"""m2cache client library: talks to m2cache workers over gRPC (grpcio + protobuf only)."""
