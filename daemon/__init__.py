"""oteo's edge runtime: scores MQTT sensor streams with a self-describing ONNX autoencoder.

This package never imports torch or `training`; the base install runs it.
"""

__version__ = "0.1.0"
