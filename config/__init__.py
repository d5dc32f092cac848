"""The bottom layer: the service's settings, which every package may import."""
