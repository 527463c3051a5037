// SPDX-License-Identifier: GPL-2.0
/*
 * Example collector eBPF probe, driver version 2.3.0: counts context switches.
 *
 * Only UAPI headers and libbpf's bpf_helpers.h: no vmlinux.h, no kernel-internal
 * structures, so the same source builds for any kernel with BPF tracepoint programs.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Per CPU, so the counter needs no atomic operation; readers sum the CPUs' values. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sched_switches SEC(".maps");

SEC("tracepoint/sched/sched_switch")
int count_sched_switch(void *ctx)
{
	__u32 key = 0;
	__u64 *count = bpf_map_lookup_elem(&sched_switches, &key);

	if (count)
		*count += 1;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
