"""Reward models (flowalign.rewards). Heavy dependencies are imported at use."""
