/* The maps, pinned under FC_PIN_DIR (set by the loader) so both programs, a restarted daemon
 * and `forecast-bpf status` all see the same ones. */
#ifndef FC_MAPS_H
#define FC_MAPS_H

#include "forecast.h"

#ifndef FC_PIN_DIR
#error "FC_PIN_DIR must be defined by the loader"
#endif
#ifndef FC_CHAIN_PIN
#error "FC_CHAIN_PIN must be defined by the loader"
#endif

BPF_TABLE_PINNED("array", u32, struct fc_config, fc_config, 1, FC_PIN_DIR "/config");
BPF_TABLE_PINNED("array", u32, struct fc_sa, fc_sas, FC_MAX_SAS, FC_PIN_DIR "/sas");
BPF_TABLE_PINNED("hash", u32, u32, fc_marks, FC_MAX_SAS, FC_PIN_DIR "/marks");
BPF_TABLE_PINNED("percpu_array", u32, struct fc_counter, fc_counters, FC_MAX_SAS * FC_DIRS,
		 FC_PIN_DIR "/counters");
/* Copies per family and direction: fc_family_counters[family * FC_DIRS + dir]. */
BPF_TABLE_PINNED("percpu_array", u32, struct fc_counter, fc_family_counters,
		 FC_FAMILIES * FC_DIRS, FC_PIN_DIR "/families");
BPF_TABLE_PINNED("percpu_array", u32, u64, fc_drops, FC_DROPS, FC_PIN_DIR "/drops");
BPF_TABLE_PINNED("percpu_array", u32, u64, fc_sa_drops, FC_MAX_SAS * FC_SA_DROPS,
		 FC_PIN_DIR "/sa_drops");
/* Shared, not per-CPU: a rate is per source, whichever CPU its packets arrive on. */
BPF_TABLE_PINNED("array", u32, struct fc_bucket, fc_buckets, FC_BUCKETS, FC_PIN_DIR "/buckets");
BPF_TABLE_PINNED("array", u32, u32, fc_targets, FC_GENS * FC_LISTS * FC_MAX_SAS,
		 FC_PIN_DIR "/targets");
BPF_TABLE_PINNED("array", u32, u32, fc_list_len, FC_GENS * FC_LISTS, FC_PIN_DIR "/list_len");
BPF_TABLE_PINNED("array", u32, u32, fc_gen, 1, FC_PIN_DIR "/gen");
/* Local-output copies for the daemon (FC_SA_LOCAL_OUT), and where the entry program keeps the
 * packet for its walkers (a tail call keeps the CPU). */
/* bcc has no pinned ring buffer: BPF_RINGBUF_OUTPUT's declaration, with a pin in its section. */
#define FC_RINGBUF_PINNED(_name, _bytes, _pinned)                                               \
	struct _name##_table_t {                                                                \
		int key;                                                                        \
		u32 leaf;                                                                       \
		int (*ringbuf_output)(void *, u64, u64);                                        \
		u32 max_entries;                                                                \
	};                                                                                      \
	__attribute__((section("maps/ringbuf:" _pinned))) struct _name##_table_t _name = {     \
		.max_entries = (_bytes)                                                         \
	}
FC_RINGBUF_PINNED(fc_local_out, FC_LOCAL_RING_BYTES, FC_PIN_DIR "/local_out");
BPF_TABLE_PINNED("percpu_array", u32, struct fc_local_copy, fc_local_scratch, 1,
		 FC_PIN_DIR "/local_scratch");
BPF_TABLE_PINNED("array", u32, u64, fc_local_results, FC_LOCAL_RESULTS,
		 FC_PIN_DIR "/local_results");
/* The walkers' slots, one per family (FC_WALK_x): one map per build and program (tail calls
 * must stay within it). */
BPF_TABLE_PINNED("prog", u32, u32, fc_chain, FC_FAMILIES, FC_CHAIN_PIN);

/* bcc rewrites map methods (.lookup) only when written in the main source file, never in a
 * header or a macro: the programs look up, these helpers only update what was found. */
static __always_inline u32 fc_counter_key(u32 slot, u32 dir)
{
	return slot * FC_DIRS + dir;
}

static __always_inline u32 fc_family_key(u32 family, u32 dir)
{
	return family * FC_DIRS + dir;
}

static __always_inline u32 fc_sa_drop_key(u32 slot, u32 reason)
{
	return slot * FC_SA_DROPS + reason;
}

static __always_inline u32 fc_target_key(u32 gen, u32 list, u32 i)
{
	return (gen * FC_LISTS + list) * FC_MAX_SAS + i;
}

static __always_inline u32 fc_list_key(u32 gen, u32 list)
{
	return gen * FC_LISTS + list;
}

static __always_inline void fc_counter_add(struct fc_counter *c, u32 len)
{
	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
}

/* A length the verifier sees bounded to [1, FC_LOCAL_MAX_PACKET]; the same value for any len in
 * that range (callers check it first). */
static __always_inline u32 fc_local_bound(u32 len)
{
	/* The compiler knows the callers' checks and would drop the mask as redundant; the
	 * verifier does not follow those checks, only the mask. */
	asm volatile("" : "+r"(len));
	return ((len - 1) & FC_LOCAL_MASK) + 1;
}

/* Keep the packet (IP header on, `len` bytes) in `copy` for the walkers' local-output copies,
 * when any SA takes them; otherwise say there is none (len 0), so no walker sends an older
 * packet. A packet too large to keep: each local-output target counts FC_DROP_LOCAL_OUT_SIZE. */
static __always_inline void fc_local_save(struct __sk_buff *skb, struct fc_local_copy *copy,
					 const struct fc_config *cfg, u32 l3, u32 len, u32 family)
{
	if (!copy)
		return;
	copy->len = 0;
	if (!cfg->n_local_out || len == 0 || len > FC_LOCAL_MAX_PACKET)
		return;
	len = fc_local_bound(len);
	if (bpf_skb_load_bytes(skb, l3, copy->packet, len) < 0)
		return;
	copy->len = len;
	copy->family = family;
}

static __always_inline void fc_drop_add(u64 *d)
{
	if (d)
		*d += 1;
}

#endif
