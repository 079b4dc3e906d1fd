"""Distributed MNIST training with Ray Train and Keras 3. Nothing runs on import."""
