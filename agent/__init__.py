"""edge-agent: serve signed, verified ML models on edge devices."""

__version__ = "0.1.0"
