"""``m2cache bench``: every system a user would pick, on one model, one prompt.

Modules:
- ``synth``          the synthetic Llama-shape checkpoint (built once, reused) and its store;
- ``honest``         page-cache control (drop caches, cgroup v1 memory limits), device read bytes;
- ``bandwidth``      each tier's measured bandwidth (SSD records cold, device, Redis MGET, memory);
- ``policy``         the mixed-precision policy (trained predictor if stored, else a random one);
- ``systems_local``  dense reference, naive layer streaming, m2cache in-process;
- ``systems_hf``     transformers dense and Accelerate disk offload;
- ``systems_stack``  the full service stack (NeuronStore + DramTier + Redis + Worker);
- ``configs``        which configurations a child runs; ``child`` the child-process entry;
- ``run``            the orchestration; ``limits`` physical limits, fidelity and targets;
- ``report``         the markdown table, the target lines and the plots.
"""
