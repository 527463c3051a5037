// SPDX-License-Identifier: GPL-2.0
/*
 * Example collector kernel module, driver version 2.3.0.
 *
 * Counts context switches through the sched/sched_switch tracepoint and shows the count
 * in /sys/module/collector/parameters/sched_switches (read-only).
 *
 * The tracepoint is looked up by name with for_each_kernel_tracepoint(): sched_switch is
 * not exported to modules as a symbol, so register_trace_sched_switch() cannot be used.
 */
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/percpu.h>
#include <linux/string.h>
#include <linux/tracepoint.h>
#include <linux/version.h>

#define DRIVER_VERSION "2.3.0"

struct task_struct;

/* Per CPU: the probe runs on every context switch and must not share a cache line. */
static DEFINE_PER_CPU(u64, sched_switches);

static u64 sum_sched_switches(void)
{
	u64 total = 0;
	int cpu;

	for_each_possible_cpu(cpu)
		total += per_cpu(sched_switches, cpu);
	return total;
}

static int get_sched_switches(char *buffer, const struct kernel_param *kp)
{
	return scnprintf(buffer, PAGE_SIZE, "%llu\n", sum_sched_switches());
}

static const struct kernel_param_ops sched_switches_ops = {
	.get = get_sched_switches,
};
module_param_cb(sched_switches, &sched_switches_ops, NULL, 0444);
MODULE_PARM_DESC(sched_switches, "context switches seen since the module was loaded");

/* The tracepoint's prototype gained prev_state in 5.18. */
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

struct tracepoint_lookup {
	const char *name;
	struct tracepoint *found;
};

static void match_tracepoint(struct tracepoint *tp, void *priv)
{
	struct tracepoint_lookup *lookup = priv;

	if (!strcmp(tp->name, lookup->name))
		lookup->found = tp;
}

static struct tracepoint *find_tracepoint(const char *name)
{
	struct tracepoint_lookup lookup = { .name = name };

	for_each_kernel_tracepoint(match_tracepoint, &lookup);
	return lookup.found;
}

static struct tracepoint *sched_switch_tp;

static int __init collector_init(void)
{
	int err;

	sched_switch_tp = find_tracepoint("sched_switch");
	if (!sched_switch_tp) {
		pr_err("collector: tracepoint sched_switch not found\n");
		return -ENOENT;
	}
	err = tracepoint_probe_register(sched_switch_tp, (void *)probe_sched_switch, NULL);
	if (err) {
		pr_err("collector: cannot attach to sched_switch: %d\n", err);
		return err;
	}
	pr_info("collector " DRIVER_VERSION ": counting context switches\n");
	return 0;
}

static void __exit collector_exit(void)
{
	tracepoint_probe_unregister(sched_switch_tp, (void *)probe_sched_switch, NULL);
	/* No probe may still run when the module's code goes away. */
	tracepoint_synchronize_unregister();
}

module_init(collector_init);
module_exit(collector_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Example collector driver: counts context switches");
MODULE_VERSION(DRIVER_VERSION);
