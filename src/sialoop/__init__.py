"""sialoop: self-improving agents through the harness and the weights, in one loop."""

__version__ = "0.1.0"
