"""flowalign.algorithms."""
