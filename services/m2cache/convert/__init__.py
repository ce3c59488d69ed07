"""Turning a checkpoint into a store: checkpoint reading (checkpoint), the
store writer (writer), calibration for pruning (calibrate) and pruning (prune)."""
