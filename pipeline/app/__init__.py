"""The application layer: daemon, CLIs, demo, subscriber, replay and batch (issue 13)."""
