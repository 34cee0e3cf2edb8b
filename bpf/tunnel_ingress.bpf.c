/* XFRM-interface ingress (decrypted traffic): a client's multicast/broadcast, IPv4 or IPv6 →
 * one copy to the LAN (multicast or broadcast MAC) and one to every other SA that takes
 * reinjected traffic; never back to the origin. The original continues to the gateway's own
 * stack. fc_tunnel_ingress makes the LAN copy and hands the packet to its family's walker
 * (fc_tunnel_walk, fc_tunnel_walk6) for the SA copies, a chunk of the reinject list per tail
 * call (forecast.h). A mark-only SA's copy is queued for the daemon (FC_SA_LOCAL_OUT).
 *
 * The same program sits on the WAN device, where a mark-only SA's decrypted traffic arrives
 * (it has no XFRM interface to arrive on); there it takes decrypted packets only. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "lib/maps.h"
#include "lib/classify.h"
#include "lib/guard.h"

/* Map methods must be written in this file (lib/maps.h says why). */
static __always_inline void fc_count(u32 slot, u32 dir, u32 len)
{
	u32 key = fc_counter_key(slot, dir);

	fc_counter_add(fc_counters.lookup(&key), len);
}

static __always_inline void fc_drop(u32 reason)
{
	fc_drop_add(fc_drops.lookup(&reason));
}

/* Queue the kept packet for the SA in `slot`: 0, or the drop reason. */
static __always_inline u32 fc_local_queue(struct fc_local_copy *copy, u32 mark, u32 slot)
{
	u32 len = copy->len;

	if (!len)
		return FC_DROP_LOCAL_OUT_SIZE; /* the entry program could not keep it: too large */
	copy->mark = mark;
	copy->slot = slot;
	if (fc_local_out.ringbuf_output(copy, FC_LOCAL_HEADER + fc_local_bound(len), 0) < 0)
		return FC_DROP_LOCAL_OUT_FULL;
	return 0;
}

static __always_inline void fc_family_count(u32 family, u32 dir, u32 len)
{
	u32 key = fc_family_key(family, dir);

	fc_counter_add(fc_family_counters.lookup(&key), len);
}

/* A drop that one SA caused or suffered: counted for it and in the totals. */
static __always_inline void fc_sa_drop(u32 slot, u32 sa_reason, u32 reason)
{
	u32 key = fc_sa_drop_key(slot, sa_reason);

	fc_drop_add(fc_sa_drops.lookup(&key));
	fc_drop(reason);
}

struct fc_eth {
	__u8 dst[ETH_ALEN];
	__u8 src[ETH_ALEN];
	__be16 proto;
};

/* Decrypted packets keep the outer MAC header in front of the inner IP header even on the L3
 * XFRM device (docs/design.md); accept either layout, found by an exact total length. */
static __always_inline int fc_find_ip(struct __sk_buff *skb, struct iphdr *ip, u32 *l3)
{
	if (fc_load_ip(skb, ETH_HLEN, ip, 1) == 0) {
		*l3 = ETH_HLEN;
		return 0;
	}
	if (fc_load_ip(skb, 0, ip, 1) == 0) {
		*l3 = 0;
		return 0;
	}
	return -1;
}

static __always_inline int fc_find_ip6(struct __sk_buff *skb, struct fc_ip6hdr *ip6, u32 *l3)
{
	if (fc_load_ip6(skb, ETH_HLEN, ip6, 1) == 0) {
		*l3 = ETH_HLEN;
		return 0;
	}
	if (fc_load_ip6(skb, 0, ip6, 1) == 0) {
		*l3 = 0;
		return 0;
	}
	return -1;
}

/* The slot of the SA this packet was decrypted by, or FC_MAX_SAS. set_mark_in = %same (or the
 * daemon's PREROUTING ESP rule) gives it that SA's inbound mark. */
static __always_inline u32 fc_origin(__u32 mark)
{
	u32 *slot = fc_marks.lookup(&mark);
	struct fc_sa *sa;
	u32 key;

	if (!mark || !slot || *slot >= FC_MAX_SAS)
		return FC_MAX_SAS;
	key = *slot;
	sa = fc_sas.lookup(&key);
	if (!sa || !(sa->flags & FC_SA_ACTIVE) || sa->mark_in != mark)
		return FC_MAX_SAS; /* the daemon is between two updates */
	return key;
}

/* The LAN copy, with `eth` (its destination and type) in front; returns where the IP header is
 * afterwards (an Ethernet header may have been added in front of it). */
static __always_inline u32 fc_copy_to_lan(struct __sk_buff *skb, const struct fc_config *cfg,
					  struct fc_eth *eth, u32 l3, u32 family, u32 origin, u32 len)
{
	if (l3 == 0) {
		if (bpf_skb_change_head(skb, ETH_HLEN, 0) < 0) {
			fc_drop(FC_DROP_NO_HEADROOM);
			return l3;
		}
		l3 = ETH_HLEN;
	}
	__builtin_memcpy(eth->src, cfg->lan_mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, eth, sizeof(*eth), 0) < 0) {
		fc_drop(FC_DROP_NO_HEADROOM);
		return l3;
	}
	asm volatile("" : "+r"(skb));
	skb->mark = 0;
	if (bpf_clone_redirect(skb, cfg->lan_ifindex, 0) == 0) {
		fc_count(origin, FC_DIR_SA_TO_LAN, len);
		fc_family_count(family, FC_DIR_SA_TO_LAN, len);
	} else {
		fc_drop(FC_DROP_CLONE_TO_LAN);
	}
	return l3;
}

/* 01:00:5e + the group's low 23 bits, or broadcast. */
static __always_inline void fc_eth_for4(struct fc_eth *eth, __u32 daddr)
{
	__u32 host = bpf_ntohl(daddr);

	if (fc_is_multicast(daddr)) {
		eth->dst[0] = 0x01;
		eth->dst[1] = 0x00;
		eth->dst[2] = 0x5e;
		eth->dst[3] = (host >> 16) & 0x7f;
		eth->dst[4] = (host >> 8) & 0xff;
		eth->dst[5] = host & 0xff;
	} else {
		__builtin_memset(eth->dst, 0xff, ETH_ALEN);
	}
	eth->proto = bpf_htons(ETH_P_IP);
}

/* 33:33 + the group's low 32 bits (RFC 2464). */
static __always_inline void fc_eth_for6(struct fc_eth *eth, const __u32 *daddr)
{
	__u32 low = bpf_ntohl(daddr[3]);

	eth->dst[0] = 0x33;
	eth->dst[1] = 0x33;
	eth->dst[2] = low >> 24;
	eth->dst[3] = (low >> 16) & 0xff;
	eth->dst[4] = (low >> 8) & 0xff;
	eth->dst[5] = low & 0xff;
	eth->proto = bpf_htons(FC_ETH_P_IPV6);
}

/* One chunk of the reinject list from cb[FC_CB_NEXT] on, then itself for the next chunk.
 * `family` is a constant in each walker below. */
static __always_inline int fc_tunnel_walk_family(struct __sk_buff *skb, const u32 family)
{
	u32 zero = 0, gen = skb->cb[FC_CB_GEN], next = skb->cb[FC_CB_NEXT];
	u32 orig_mark = skb->cb[FC_CB_MARK], daddr = skb->cb[FC_CB_DADDR], len = skb->cb[FC_CB_LEN];
	u32 list_key = fc_list_key(gen, FC_LIST_REINJECT);
	struct fc_config *cfg = fc_config.lookup(&zero);
	u32 *count = fc_list_len.lookup(&list_key);
	u32 family_key = fc_family_key(family, FC_DIR_SA_TO_SA);
	/* Looked up once: a copy count carried through the loop would multiply the verifier's
	 * states by every value it can take. */
	struct fc_counter *family_total = fc_family_counters.lookup(&family_key);
	struct fc_local_copy *local = fc_local_scratch.lookup(&zero);
	__u32 daddr6[4] = {};
	u32 end;

	/* Every check ahead of the loop: each branch inside it is verified once per entry, and
	 * the walker is close to the verifier's limit (docs/design.md, Scale). */
	if (!cfg || !count || !family_total || !local)
		goto out;
	if (family == FC_FAMILY_IPV6 &&
	    bpf_skb_load_bytes(skb, daddr + __builtin_offsetof(struct fc_ip6hdr, daddr), daddr6,
			       sizeof(daddr6)) < 0)
		goto out;
	end = *count;
	for (u32 k = 0; k < FC_CHUNK; k++) {
		u32 key = fc_target_key(gen, FC_LIST_REINJECT, next + k);
		u32 *target, slot;
		struct fc_sa *sa;

		if (next + k >= end)
			break;
		target = fc_targets.lookup(&key);
		if (!target)
			break;
		slot = *target;
		sa = fc_sas.lookup(&slot);
		/* The origin is skipped by its mark: never back to the SA it came from. */
		if (!sa || !(sa->flags & FC_SA_ACTIVE) || !(sa->flags & FC_SA_REINJECT) ||
		    sa->mark_in == orig_mark ||
		    (family == FC_FAMILY_IPV6 ? !fc_sa_wants6(sa, daddr6) : !fc_sa_wants(sa, daddr)))
			continue;
		if (sa->flags & FC_SA_LOCAL_OUT) {
			u32 reason = fc_local_queue(local, sa->mark_out, slot);

			if (!reason) {
				fc_count(slot, FC_DIR_SA_TO_SA, len);
				family_total->packets += 1;
				family_total->bytes += len;
			} else {
				fc_sa_drop(slot, FC_SA_DROP_LOCAL_OUT, reason);
			}
			continue;
		}
		asm volatile("" : "+r"(skb));
		skb->mark = sa->mark_out;
		if (bpf_clone_redirect(skb, cfg->xfrm_ifindex, 0) == 0) {
			fc_count(slot, FC_DIR_SA_TO_SA, len);
			family_total->packets += 1;
			family_total->bytes += len;
		} else {
			fc_sa_drop(slot, FC_SA_DROP_CLONE, FC_DROP_CLONE_TO_SA);
		}
	}
	if (next + FC_CHUNK < end) {
		asm volatile("" : "+r"(skb));
		skb->cb[FC_CB_NEXT] = next + FC_CHUNK;
		fc_chain.call(skb, family);
		fc_drop(FC_DROP_CHAIN); /* only reached when the tail call failed */
	}
out:
	asm volatile("" : "+r"(skb));
	skb->mark = orig_mark;
	return TC_ACT_OK;
}

int fc_tunnel_walk(struct __sk_buff *skb)
{
	return fc_tunnel_walk_family(skb, FC_FAMILY_IPV4);
}

int fc_tunnel_walk6(struct __sk_buff *skb)
{
	return fc_tunnel_walk_family(skb, FC_FAMILY_IPV6);
}

/* Who sent it, what it may be copied to, then its copies: `dirs` from the group filter, `eth`
 * the LAN copy's header, `ttl` its TTL or hop limit, `where` what the walker needs to find the
 * destination (FC_CB_DADDR). */
static __always_inline int fc_tunnel_copies(struct __sk_buff *skb, const struct fc_config *cfg,
					    u32 gen, u32 family, u32 dirs, struct fc_eth *eth,
					    u32 ttl, u32 l3, u32 where, u32 len)
{
	u32 orig_mark = skb->mark, origin = fc_origin(orig_mark), list_key, *count, zero = 0;
	int to_lan = dirs & (1 << FC_DIR_SA_TO_LAN), to_sas = dirs & (1 << FC_DIR_SA_TO_SA);

	if (origin >= FC_MAX_SAS) {
		fc_drop(FC_DROP_UNKNOWN_ORIGIN);
		return TC_ACT_OK;
	}
	if (ttl == 0) {
		fc_drop(FC_DROP_TTL);
		return TC_ACT_OK;
	}
	/* Clients may only send what the configuration lets them, per direction: by default the
	 * LAN's own groups, so no client can speak OSPF, VRRP or PIM onto the LAN. */
	if (!to_lan)
		fc_sa_drop(origin, FC_SA_DROP_GROUP_TO_LAN, FC_DROP_GROUP_TO_LAN);
	if (!to_sas)
		fc_sa_drop(origin, FC_SA_DROP_GROUP_TO_SAS, FC_DROP_GROUP_TO_SAS);
	if (!to_lan && !to_sas)
		return TC_ACT_OK;
	/* One token per packet from this SA, before any copy: a flooding client costs the
	 * gateway one lookup per packet, not one encryption per other client. */
	if (!fc_rate_ok(fc_buckets.lookup(&origin), &cfg->sa_rate)) {
		fc_sa_drop(origin, FC_SA_DROP_STORM, FC_DROP_STORM_SA);
		return TC_ACT_OK;
	}
	if (to_lan && cfg->lan_ifindex) {
		l3 = fc_copy_to_lan(skb, cfg, eth, l3, family, origin, len);
		/* the IPv6 walker reads the destination where the header is now */
		if (family == FC_FAMILY_IPV6)
			where = l3;
	}

	/* One generation for the whole walk: the daemon only rewrites the other one. */
	list_key = fc_list_key(gen, FC_LIST_REINJECT);
	count = fc_list_len.lookup(&list_key);
	asm volatile("" : "+r"(skb));
	skb->mark = orig_mark;
	if (!to_sas || !count || !*count)
		return TC_ACT_OK;
	fc_local_save(skb, fc_local_scratch.lookup(&zero), cfg, l3, len, family);
	skb->cb[FC_CB_GEN] = gen;
	skb->cb[FC_CB_NEXT] = 0;
	skb->cb[FC_CB_MARK] = orig_mark;
	skb->cb[FC_CB_DADDR] = where;
	skb->cb[FC_CB_LEN] = len;
	fc_chain.call(skb, family);
	fc_drop(FC_DROP_CHAIN);
	return TC_ACT_OK;
}

static __always_inline int fc_tunnel_ingress6(struct __sk_buff *skb, const struct fc_config *cfg,
					       u32 gen)
{
	struct fc_ip6hdr ip6;
	struct fc_eth eth = {};
	u32 l3;

	if (fc_find_ip6(skb, &ip6, &l3) < 0) {
		fc_drop(FC_DROP_MALFORMED);
		return TC_ACT_OK;
	}
	if (!fc_is_multicast6(ip6.daddr) || fc_is_dhcp6(skb, l3, &ip6))
		return TC_ACT_OK;
	fc_eth_for6(&eth, ip6.daddr);
	return fc_tunnel_copies(skb, cfg, gen, FC_FAMILY_IPV6, fc_group6_dirs(cfg, ip6.daddr), &eth,
				ip6.hop_limit, l3, l3, FC_IP6_HLEN + bpf_ntohs(ip6.payload_len));
}

int fc_tunnel_ingress(struct __sk_buff *skb)
{
	u32 zero = 0;
	struct fc_config *cfg = fc_config.lookup(&zero);
	u32 *gen = fc_gen.lookup(&zero);
	struct iphdr ip;
	struct fc_eth eth = {};
	u32 l3, daddr;
	int bcast;

	if (!cfg || !gen)
		return TC_ACT_OK;
	/* On the WAN device only what an SA decrypted: the rest is the WAN's own traffic. */
	if (skb->ifindex != cfg->xfrm_ifindex && !fc_decrypted(skb))
		return TC_ACT_OK;
	if (skb->protocol == bpf_htons(FC_ETH_P_IPV6))
		return fc_tunnel_ingress6(skb, cfg, *gen);
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (fc_find_ip(skb, &ip, &l3) < 0) {
		fc_drop(FC_DROP_MALFORMED);
		return TC_ACT_OK;
	}
	daddr = ip.daddr;
	bcast = fc_is_broadcast(daddr, cfg);
	if (!bcast && !fc_is_multicast(daddr))
		return TC_ACT_OK;
	if (fc_is_dhcp(skb, l3, &ip))
		return TC_ACT_OK;
	fc_eth_for4(&eth, daddr);
	return fc_tunnel_copies(skb, cfg, *gen, FC_FAMILY_IPV4, fc_group_dirs(cfg, daddr, bcast),
				&eth, ip.ttl, l3, daddr, bpf_ntohs(ip.tot_len));
}
