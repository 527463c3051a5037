"""Building: the builder's shard run (shard, safetar, bundle, compile, shard_run), kernel
bundles from Debian (bundles, debian), driver sources, boot images and VM tests
(boot_images, vmtest), OCI images and support packages."""
