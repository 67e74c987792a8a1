"""flowalign.runtime: training infrastructure that knows no algorithm: checkpoints (dict I/O), distributed data
parallel and FSDP, kernel switches, the metrics log, weight snapshots and the evaluation EMA."""

__all__ = ["checkpoint", "distributed", "ema", "fsdp", "kernels", "metrics", "snapshot"]  # submodules
