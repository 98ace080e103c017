"""Data shipped with edgebuild: the device catalog."""
