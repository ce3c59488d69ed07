"""DramTier service: a layer-aware Redis cache (DRAM) in front of the NeuronStore."""
