"""In-process use of a converted store (no services): the model, tokenizer and
neuron bank loaded from a NeuronStore, and the store as the HBM cache's lower tier."""
