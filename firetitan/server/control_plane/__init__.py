"""The control plane: trainer jobs, deployments, training shapes and checkpoints over HTTP."""
