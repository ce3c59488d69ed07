"""``m2cache plan``: what a token costs on given hardware, before buying or wiring it.

Modules:
- ``profiles``  hardware profiles (YAML in ``hardware/``): tiers, power, price, embodied carbon;
- ``shapes``    model shapes from a store, a checkpoint or a name (Llama-2 7B/13B/70B);
- ``traffic``   bytes per token per tier: from ``m2cache bench`` results or the cache model;
- ``placement`` which tier holds what (dense weights, HBM cache, DRAM, CXL, SSD) and the flags;
- ``roofline``  seconds per token from bytes, bandwidths, compute and the engine's overhead;
- ``power``     joules, gCO2 and dollars per token (also the worker's live accounting);
- ``measure``   a profile of this machine measured by the tool (tier probes, calibration);
- ``probes``    the engine's per-token costs on this machine (decode steps of probe layers);
- ``bench_traffic`` bytes per token per tier taken from an ``m2cache bench`` results.json;
- ``validate``  predictions against the benchmark's measurements, side by side;
- ``report``    tables and plots.
"""
