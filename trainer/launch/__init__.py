"""The Kubernetes launcher: typed manifest builders and a small client. It never imports TensorFlow."""
