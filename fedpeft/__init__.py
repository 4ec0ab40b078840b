"""fedpeft: federated personalization simulator for language models."""

__version__ = "0.1.0"
