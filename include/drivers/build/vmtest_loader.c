// SPDX-License-Identifier: GPL-2.0
/*
 * The vm-test's eBPF loader: load a probe object into the running kernel (its verifier
 * decides), attach every program where its section says, make a little activity, read
 * back the events the probe counted, detach. Built statically against libbpf so it runs
 * in a busybox initramfs. Everything that matters goes to stdout as "VMTEST:" markers:
 *
 *   VMTEST:BPF_OPEN_FAILED <why>      the object is not a usable eBPF ELF
 *   VMTEST:BPF_VERIFIER <line>        the kernel's verifier log, last lines
 *   VMTEST:BPF_REJECTED <errno text>  the kernel refused a program (verifier or other)
 *   VMTEST:BPF_LOADED <programs>
 *   VMTEST:BPF_ATTACH_FAILED <program> <errno text>
 *   VMTEST:BPF_ATTACHED <links>
 *   VMTEST:BPF_EVENTS <n>             sum over CPUs of key 0 of every array map
 *   VMTEST:BPF_DETACHED
 *
 * Usage: vmtest-loader PROBE.o
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#define MARK "VMTEST:"
#define LOG_KEEP 8192

static char verifier_log[LOG_KEEP];
static size_t verifier_len;

/* libbpf's messages (the verifier log among them): keep the tail for the markers. */
static int keep_log(enum libbpf_print_level level, const char *fmt, va_list args)
{
	char line[1024];
	int n = vsnprintf(line, sizeof(line), fmt, args);

	if (level == LIBBPF_DEBUG || n <= 0)
		return 0;
	if ((size_t)n >= sizeof(line))
		n = sizeof(line) - 1;
	if (verifier_len + n >= LOG_KEEP) {
		size_t drop = verifier_len + n - LOG_KEEP + 1;

		memmove(verifier_log, verifier_log + drop, verifier_len - drop);
		verifier_len -= drop;
	}
	memcpy(verifier_log + verifier_len, line, n);
	verifier_len += n;
	verifier_log[verifier_len] = '\0';
	return 0;
}

static void print_log_tail(int lines)
{
	char *end = verifier_log + verifier_len, *p = end;
	int seen = 0;

	while (p > verifier_log && seen <= lines)
		if (*--p == '\n')
			seen++;
	for (char *line = strtok(p, "\n"); line; line = strtok(NULL, "\n"))
		if (*line)
			printf(MARK "BPF_VERIFIER %s\n", line);
}

static unsigned long long count_events(struct bpf_object *obj)
{
	int cpus = libbpf_num_possible_cpus();
	unsigned long long total = 0, *values;
	struct bpf_map *map;

	if (cpus <= 0)
		return 0;
	values = calloc(cpus, sizeof(*values));
	bpf_object__for_each_map(map, obj) {
		enum bpf_map_type type = bpf_map__type(map);
		__u32 key = 0;
		int n = type == BPF_MAP_TYPE_PERCPU_ARRAY ? cpus : 1;

		if ((type != BPF_MAP_TYPE_ARRAY && type != BPF_MAP_TYPE_PERCPU_ARRAY) ||
		    bpf_map__value_size(map) != sizeof(__u64))
			continue;
		memset(values, 0, cpus * sizeof(*values));
		if (bpf_map_lookup_elem(bpf_map__fd(map), &key, values))
			continue;
		for (int i = 0; i < n; i++)
			total += values[i];
	}
	free(values);
	return total;
}

int main(int argc, char **argv)
{
	struct bpf_link *links[64];
	struct bpf_program *prog;
	struct bpf_object *obj;
	int n_links = 0, n_progs = 0, err;

	if (argc != 2) {
		fprintf(stderr, "usage: %s PROBE.o\n", argv[0]);
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	libbpf_set_print(keep_log);

	obj = bpf_object__open_file(argv[1], NULL);
	err = libbpf_get_error(obj);
	if (err) {
		printf(MARK "BPF_OPEN_FAILED %s\n", strerror(-err));
		print_log_tail(4);
		return 1;
	}
	bpf_object__for_each_program(prog, obj)
		n_progs++;
	err = bpf_object__load(obj);
	if (err) {
		print_log_tail(12);
		printf(MARK "BPF_REJECTED %s\n", strerror(-err));
		return 1;
	}
	printf(MARK "BPF_LOADED %d\n", n_progs);

	bpf_object__for_each_program(prog, obj) {
		struct bpf_link *link = bpf_program__attach(prog);

		err = libbpf_get_error(link);
		if (err) {
			print_log_tail(4);
			printf(MARK "BPF_ATTACH_FAILED %s %s\n", bpf_program__name(prog),
			       strerror(-err));
			return 1;
		}
		if (n_links < 64)
			links[n_links++] = link;
	}
	printf(MARK "BPF_ATTACHED %d\n", n_links);

	for (int i = 0; i < 8; i++)
		usleep(20000); /* each sleep is a context switch, at least */
	printf(MARK "BPF_EVENTS %llu\n", count_events(obj));

	for (int i = 0; i < n_links; i++)
		bpf_link__destroy(links[i]);
	bpf_object__close(obj);
	printf(MARK "BPF_DETACHED\n");
	return 0;
}
