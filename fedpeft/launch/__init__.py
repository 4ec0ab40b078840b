"""Before a run's compute starts: its config assembled from the command line, a sweep or a file,
and everything it must fit checked (strategy, method, backbone, privacy, packing, Ray, W&B)."""
