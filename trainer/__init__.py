"""Distributed TensorFlow training of MNIST classifiers (see README.md)."""
