/* What may be copied at all: the per-direction group filter and the storm guard. Both run
 * before the first clone, so a refused packet costs no copy and no encryption. */
#ifndef FC_GUARD_H
#define FC_GUARD_H

#include "forecast.h"

/* The directions (bits 1 << FC_DIR_x) in which a destination is forwarded. Broadcast goes
 * every way (as the plugin); a multicast group only where the configuration lets it. */
static __always_inline __u32 fc_group_dirs(const struct fc_config *cfg, __u32 daddr, int bcast)
{
	__u32 dirs = cfg->any_group_dirs;

	if (bcast)
		return (1 << FC_DIR_LAN_TO_SA) | (1 << FC_DIR_SA_TO_LAN) | (1 << FC_DIR_SA_TO_SA);
#pragma unroll
	for (int g = 0; g < FC_MAX_GROUPS; g++) {
		if (g >= cfg->n_groups)
			break;
		if (cfg->groups[g] == daddr)
			dirs |= cfg->group_dirs[g];
	}
	return dirs;
}

/* As fc_group_dirs for an IPv6 group (IPv6 has no broadcast). */
static __always_inline __u32 fc_group6_dirs(const struct fc_config *cfg, const __u32 *daddr)
{
	__u32 dirs = cfg->any_group_dirs;

#pragma unroll
	for (int g = 0; g < FC_MAX_GROUPS; g++) {
		if (g >= cfg->n_groups6)
			break;
		const __u32 *group = cfg->groups6[g].addr;

		if (group[0] == daddr[0] && group[1] == daddr[1] && group[2] == daddr[2] &&
		    group[3] == daddr[3])
			dirs |= cfg->group6_dirs[g];
	}
	return dirs;
}

/* 1: within the rate (the packet takes a token); 0: over it. A generic cell rate algorithm:
 * the bucket is a time, `tat`, when it will be empty again; a packet is refused when that lies
 * a whole burst ahead. Two CPUs racing on an idle bucket can each reset it, so under
 * contention a burst may admit one packet per CPU more: never more than that. */
static __always_inline int fc_rate_ok(struct fc_bucket *b, const struct fc_rate *rate)
{
	__u64 now, tat;

	if (!rate->interval_ns)
		return 1;
	if (!b)
		return 0; /* no bucket for a limited source: refuse rather than flood */
	now = bpf_ktime_get_ns();
	tat = b->tat;
	if (tat <= now) {
		b->tat = now + rate->interval_ns;
		return 1;
	}
	if (tat - now >= rate->burst_ns)
		return 0;
	__sync_fetch_and_add(&b->tat, rate->interval_ns);
	return 1;
}

#endif
