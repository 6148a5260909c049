"""The camera daemon: stage wiring, bounded queues, supervision, metrics and the `veilcam` CLI."""

__version__ = "0.1.0"
