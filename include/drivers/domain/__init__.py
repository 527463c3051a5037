"""Domain: pure Python, no I/O beyond local files: kernels, selectors, driver names,
blocklist, config, planner, plan view, driver checks, the bucket layout, deterministic
bytes (gzip, hashing writer)."""
