"""The `visionyard` command line: the embedded-stack supervisor, dataset upload, training, watch and demo."""
