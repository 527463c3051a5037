// SPDX-License-Identifier: GPL-2.0
/*
 * Example collector kernel module, driver version 2.4.0-rc1.
 *
 * Counts context switches (sched/sched_switch) and program executions
 * (sched/sched_process_exec) and shows the counts, read-only, in
 * /sys/module/collector/parameters/{sched_switches,process_execs}.
 *
 * Tracepoints are looked up by name with for_each_kernel_tracepoint(): they are not
 * exported to modules as symbols, so register_trace_<name>() cannot be used.
 */
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/percpu.h>
#include <linux/string.h>
#include <linux/tracepoint.h>
#include <linux/types.h>
#include <linux/version.h>

#define DRIVER_VERSION "2.4.0-rc1"

struct linux_binprm;
struct task_struct;

/* Per CPU: the probes run on every context switch and must not share a cache line. */
static DEFINE_PER_CPU(u64, sched_switches);
static DEFINE_PER_CPU(u64, process_execs);

#define DEFINE_COUNT_PARAM(counter, description)                                  \
	static int get_##counter(char *buffer, const struct kernel_param *kp)    \
	{                                                                          \
		u64 total = 0;                                                     \
		int cpu;                                                           \
                                                                                   \
		for_each_possible_cpu(cpu)                                         \
			total += per_cpu(counter, cpu);                            \
		return scnprintf(buffer, PAGE_SIZE, "%llu\n", total);              \
	}                                                                          \
	static const struct kernel_param_ops counter##_ops = { .get = get_##counter }; \
	module_param_cb(counter, &counter##_ops, NULL, 0444);                      \
	MODULE_PARM_DESC(counter, description)

DEFINE_COUNT_PARAM(sched_switches, "context switches seen since the module was loaded");
DEFINE_COUNT_PARAM(process_execs, "program executions seen since the module was loaded");

/* The sched_switch prototype gained prev_state in 5.18. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 18, 0)
static void probe_sched_switch(void *data, bool preempt, struct task_struct *prev,
			       struct task_struct *next, unsigned int prev_state)
#else
static void probe_sched_switch(void *data, bool preempt, struct task_struct *prev,
			       struct task_struct *next)
#endif
{
	this_cpu_inc(sched_switches);
}

static void probe_sched_process_exec(void *data, struct task_struct *p, pid_t old_pid,
				     struct linux_binprm *bprm)
{
	this_cpu_inc(process_execs);
}

static struct collector_probe {
	const char *tracepoint_name;
	void *probe;
	struct tracepoint *tracepoint; /* set while attached */
} probes[] = {
	{ "sched_switch", probe_sched_switch },
	{ "sched_process_exec", probe_sched_process_exec },
};

static void match_tracepoints(struct tracepoint *tp, void *priv)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(probes); i++)
		if (!strcmp(tp->name, probes[i].tracepoint_name))
			probes[i].tracepoint = tp;
}

static void detach_all(void)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(probes); i++) {
		if (probes[i].tracepoint)
			tracepoint_probe_unregister(probes[i].tracepoint, probes[i].probe, NULL);
	}
	/* No probe may still run when the module's code goes away. */
	tracepoint_synchronize_unregister();
}

static int __init collector_init(void)
{
	size_t i;
	int err;

	for_each_kernel_tracepoint(match_tracepoints, NULL);
	for (i = 0; i < ARRAY_SIZE(probes); i++) {
		if (!probes[i].tracepoint) {
			pr_err("collector: tracepoint %s not found\n", probes[i].tracepoint_name);
			return -ENOENT;
		}
	}
	for (i = 0; i < ARRAY_SIZE(probes); i++) {
		err = tracepoint_probe_register(probes[i].tracepoint, probes[i].probe, NULL);
		if (err) {
			pr_err("collector: cannot attach to %s: %d\n", probes[i].tracepoint_name, err);
			/* Only the probes before this one are attached: detach just those. */
			for (; i < ARRAY_SIZE(probes); i++)
				probes[i].tracepoint = NULL;
			detach_all();
			return err;
		}
	}
	pr_info("collector " DRIVER_VERSION ": counting context switches and executions\n");
	return 0;
}

static void __exit collector_exit(void)
{
	detach_all();
}

module_init(collector_init);
module_exit(collector_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Example collector driver: counts context switches and executions");
MODULE_VERSION(DRIVER_VERSION);
