"""The exit statuses of the builder and VM-test entrypoints (BSD sysexits), which the
DAG's runtimes read: 65 fails a task without retries, 75 retries it."""

EX_OK = 0
EX_DATAERR = 65  # bad input (shard, bundle, sources, bucket, builder image): do not retry
EX_SOFTWARE = 70  # a bug here
EX_TEMPFAIL = 75  # storage unreachable, disk full, pod stopped, VM did not boot: retry
