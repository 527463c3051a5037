"""Building: kernel bundles, driver sources, the builder's shard run, VM tests,
OCI images and support packages."""
