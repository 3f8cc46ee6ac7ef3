"""The firetitan services: control plane, trainer workers and deployment workers."""
