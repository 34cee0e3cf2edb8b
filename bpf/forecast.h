/* forecast-bpf: the one definition of every layout shared by the TC programs and the daemon.
 * forecast/layout.py mirrors this file; tests/unit/test_layout.py keeps the two equal. */
#ifndef FORECAST_H
#define FORECAST_H

/* A packet's copies are made by walking a dense list of target slots, FC_CHUNK entries per
 * program run, the walker tail-calling itself for the next chunk. The kernel allows 33 tail
 * calls per packet, so a list holds at most 33 chunks; the table holds what a list can reach.
 * Per-packet work follows the list's length (the SAs that get a copy), never the capacity.
 * Chunk size vs verifier cost and load time: docs/design.md, Scale. */
#define FC_CHUNK 256
#define FC_TAIL_CALLS 33
#define FC_MAX_SAS 8448 /* FC_CHUNK * FC_TAIL_CALLS */
/* Remote traffic selectors per SA that can hold a multicast/broadcast destination. */
#define FC_MAX_TS 4
/* Multicast groups forwarded from the LAN (the plugin's `groups`), per address family. */
#define FC_MAX_GROUPS 16

/* Address families: totals per family (fc_family_counters), the walker slot per family. */
#define FC_FAMILY_IPV4 0
#define FC_FAMILY_IPV6 1
#define FC_FAMILIES 2

/* Counter directions, per SA slot: counters[slot * FC_DIRS + dir]. */
#define FC_DIR_LAN_TO_SA 0 /* LAN multicast/broadcast copied to this SA */
#define FC_DIR_SA_TO_LAN 1 /* this SA's decrypted multicast/broadcast copied to the LAN */
#define FC_DIR_SA_TO_SA 2  /* another SA's multicast/broadcast copied to this SA */
#define FC_DIRS 3

/* Drop reasons: drops[reason]. */
#define FC_DROP_CLONE_TO_SA 0     /* bpf_clone_redirect to the XFRM interface failed */
#define FC_DROP_CLONE_TO_LAN 1    /* bpf_clone_redirect to the LAN device failed */
#define FC_DROP_UNKNOWN_ORIGIN 2  /* decrypted packet whose mark names no SA in the table */
#define FC_DROP_MALFORMED 3       /* no complete IPv4/IPv6 header where one must be */
#define FC_DROP_NO_HEADROOM 4     /* no room for the LAN copy's Ethernet header */
#define FC_DROP_CHAIN 5           /* the walker's tail call failed: the rest of a list got no copy */
#define FC_DROP_STORM_LAN 6       /* LAN multicast/broadcast over the LAN's rate: no copies */
#define FC_DROP_STORM_SA 7        /* a client's packet over its SA's rate: no copies (sa_drops) */
#define FC_DROP_GROUP_TO_LAN 8    /* a client's packet to a group not forwarded to the LAN */
#define FC_DROP_GROUP_TO_SAS 9    /* a client's packet to a group not forwarded to other clients */
#define FC_DROP_TTL 10            /* TTL (hop limit) 0: no sender may emit it, nor a copy */
#define FC_DROP_LOCAL_OUT_FULL 11 /* local-output queue full (the daemon is behind, or down) */
#define FC_DROP_LOCAL_OUT_SIZE 12 /* a local-output copy not made: over FC_LOCAL_MAX_PACKET */
#define FC_DROPS 13

/* Per-SA drop reasons: sa_drops[slot * FC_SA_DROPS + reason]; packets from (or copies to) the
 * SA in that slot. Zeroed with the counters when a slot gets another SA. */
#define FC_SA_DROP_STORM 0        /* from this SA, over its rate: no copy made */
#define FC_SA_DROP_GROUP_TO_LAN 1 /* from this SA, to a group clients may not send to the LAN */
#define FC_SA_DROP_GROUP_TO_SAS 2 /* from this SA, to a group clients may not send to clients */
#define FC_SA_DROP_CLONE 3        /* a copy to this SA the XFRM interface refused */
#define FC_SA_DROP_LOCAL_OUT 4    /* a copy to this SA the local-output queue could not take */
#define FC_SA_DROPS 5

/* Token buckets (GCRA): buckets[slot] per source SA, buckets[FC_BUCKET_LAN] for the LAN. */
#define FC_BUCKET_LAN FC_MAX_SAS
#define FC_BUCKETS (FC_MAX_SAS + 1)

/* Target lists (fc_targets), each a dense array of SA slots, twice over: the daemon rewrites the
 * generation no packet reads, then flips fc_gen, so a packet walks one whole list version. */
#define FC_LIST_LAN 0      /* every SA in the table: LAN multicast/broadcast goes to these */
#define FC_LIST_REINJECT 1 /* SAs that take other clients' multicast/broadcast */
#define FC_LISTS 2
#define FC_GENS 2

/* fc_sa.flags */
#define FC_SA_ACTIVE 0x1
#define FC_SA_REINJECT 0x2 /* gets copies of other clients' multicast/broadcast */
/* A mark-only SA (no if_id): its policies match only packets that take the local output path,
 * so its copies are queued to the daemon (fc_local_out), which sends each one with the SA's
 * mark from a raw socket (docs/design.md, The local-output path). */
#define FC_SA_LOCAL_OUT 0x4

/* The local-output queue: a ring buffer of whole IP packets, each with the target SA's mark.
 * It is pinned, so copies queued while no daemon runs are sent by the next one. */
#define FC_LOCAL_RING_BYTES (4 << 20)
/* Any jumbo frame's IP packet; a larger one gets no local-output copy (counted, never cut).
 * A power of two: the verifier takes ((len - 1) & FC_LOCAL_MASK) + 1 as a bounded length. */
#define FC_LOCAL_MAX_PACKET 16384
#define FC_LOCAL_MASK (FC_LOCAL_MAX_PACKET - 1)

struct fc_ts {
	__u32 addr; /* network byte order, already masked */
	__u32 mask; /* network byte order; 0 matches everything (0.0.0.0/0) */
};

struct fc_in6 {
	__u32 addr[4]; /* network byte order */
};

struct fc_ts6 {
	__u32 addr[4]; /* network byte order, already masked */
	__u32 mask[4]; /* network byte order; all 0 matches everything (::/0) */
};

struct fc_sa {
	__u32 flags;
	__u32 mark_out; /* set on copies to this SA: selects its outbound policy */
	__u32 mark_in;  /* carried by its decrypted packets (set_mark_in = %same) */
	__u32 n_ts;
	struct fc_ts ts[FC_MAX_TS];
	__u32 n_ts6;
	struct fc_ts6 ts6[FC_MAX_TS];
};

/* A rate limit as the programs apply it: at most burst_ns / interval_ns packets at once, then
 * one per interval_ns. interval_ns 0: no limit. */
struct fc_rate {
	__u64 interval_ns;
	__u64 burst_ns;
};

/* The state of one token bucket: the time at which it is empty again ("theoretical arrival
 * time"); in the past means full. One u64, so CPUs share it with an atomic add. */
struct fc_bucket {
	__u64 tat;
};

struct fc_config {
	__u32 xfrm_ifindex;
	__u32 lan_ifindex;
	__u32 lan_broadcast; /* network byte order */
	__u32 n_groups;
	__u32 groups[FC_MAX_GROUPS];     /* network byte order */
	__u32 group_dirs[FC_MAX_GROUPS]; /* bit (1 << FC_DIR_x): direction x forwards that group */
	__u32 any_group_dirs;            /* directions that forward every multicast group */
	__u8 lan_mac[6];
	__u8 pad[6]; /* the rates start 8-aligned: no hidden padding */
	struct fc_rate lan_rate; /* LAN multicast/broadcast, all copies of a packet count once */
	struct fc_rate sa_rate;  /* each client SA's multicast/broadcast */
	__u32 n_groups6;
	__u32 group6_dirs[FC_MAX_GROUPS]; /* as group_dirs, for groups6 */
	struct fc_in6 groups6[FC_MAX_GROUPS];
	__u32 n_local_out; /* SAs with FC_SA_LOCAL_OUT: 0 spares every packet the copy into fc_local_copy */
};

/* fc_targets[fc_target_key(gen, list, i)] = slot; fc_list_len[fc_list_key(gen, list)] = n. */

/* What a packet carries from the entry program through the walker's tail calls (skb->cb). */
#define FC_CB_GEN 0
#define FC_CB_NEXT 1  /* next list index to walk */
#define FC_CB_MARK 2  /* the packet's own mark: restored at the end, and names its origin SA */
#define FC_CB_DADDR 3 /* IPv4: the destination. IPv6: the offset of the IPv6 header (a 16-byte
		       * destination does not fit in cb; the walker reads it from the packet) */
#define FC_CB_LEN 4

/* The walker of each family, by its index in fc_chain: the entry program picks one, and each
 * walker tail-calls itself. Two walkers, not one with a branch: each keeps the verifier cost of
 * one family's selector test in its 256-entry loop. */
#define FC_WALK_IPV4 FC_FAMILY_IPV4
#define FC_WALK_IPV6 FC_FAMILY_IPV6

/* fc_marks: SA inbound mark (mark_in) → its slot, so a decrypted packet's origin is one lookup,
 * not a second scan of the table (two scans in one program exceed the verifier's budget). */

/* What became of local-output copies, written by the daemon's sender (no program touches it):
 * local_results[result], pinned like the other counters, so `status` reads it live. */
#define FC_LOCAL_SENT 0       /* sent (encrypted by the SA's policy) */
#define FC_LOCAL_NOT_LIVE 1   /* its SA had gone before the copy was sent */
#define FC_LOCAL_REFUSED 2    /* dropped by the SA's guard: no policy, so never in clear */
#define FC_LOCAL_TOO_LARGE 3  /* larger than the path MTU (raw sends do not fragment) */
#define FC_LOCAL_UNREACHABLE 4
#define FC_LOCAL_NO_BUFFER 5
#define FC_LOCAL_OTHER 6      /* any other send error */
#define FC_LOCAL_UNSUPPORTED 7 /* a family the path does not send (IPv6) */
#define FC_LOCAL_RESULTS 8

/* One local-output copy as queued (fc_local_out) and, before that, the packet as the entry
 * program saved it (fc_local_scratch, per CPU): the walkers fill in mark and slot per target. */
struct fc_local_copy {
	__u32 mark; /* the target SA's mark_out: the copy's SO_MARK */
	__u32 slot; /* the target SA's slot */
	__u16 len;  /* bytes of packet; 0: nothing saved (too large, or no local-output SA) */
	__u8 family;
	__u8 pad[5];
	__u8 packet[FC_LOCAL_MAX_PACKET]; /* the IP packet, from its IP header on */
};
#define FC_LOCAL_HEADER 16 /* bytes of fc_local_copy before packet */

struct fc_counter {
	__u64 packets;
	__u64 bytes;
};

#endif /* FORECAST_H */
