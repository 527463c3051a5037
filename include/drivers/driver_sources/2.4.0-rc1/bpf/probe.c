// SPDX-License-Identifier: GPL-2.0
/*
 * Example collector eBPF probe, driver version 2.4.0-rc1: counts context switches and
 * program executions.
 *
 * Only UAPI headers and libbpf's bpf_helpers.h: no vmlinux.h, no kernel-internal
 * structures, so the same source builds for any kernel with BPF tracepoint programs.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

enum counter {
	SCHED_SWITCHES = 0,
	PROCESS_EXECS = 1,
	COUNTERS,
};

/* Per CPU, so a counter needs no atomic operation; readers sum the CPUs' values. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 key)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &key);

	if (value)
		*value += 1;
}

SEC("tracepoint/sched/sched_switch")
int count_sched_switch(void *ctx)
{
	count(SCHED_SWITCHES);
	return 0;
}

SEC("tracepoint/sched/sched_process_exec")
int count_process_exec(void *ctx)
{
	count(PROCESS_EXECS);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
