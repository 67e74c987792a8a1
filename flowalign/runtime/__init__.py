"""flowalign.runtime: training infrastructure that knows no algorithm: checkpoints (dict I/O), distributed data
parallel and FSDP, kernel switches, the machine a figure was measured on, the metrics log, weight snapshots and the evaluation EMA."""

__all__ = ["checkpoint", "distributed", "ema", "fsdp", "kernels", "machine", "metrics", "snapshot"]  # submodules
