"""Processing service: instrument/rest mixing, silence statistics and adjustment, dataset manifests."""
