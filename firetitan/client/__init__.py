"""The firetitan SDK clients: service, training, sampling, concurrency control."""
