"""ROBench: the shared adversarial-training engine and evaluation pipeline."""

__version__ = "0.1.0"
