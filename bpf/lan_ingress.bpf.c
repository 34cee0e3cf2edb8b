/* LAN ingress: multicast in `groups` and broadcast from the LAN, IPv4 and IPv6 → one copy to
 * every SA whose remote traffic selectors contain the destination. The original continues
 * untouched. fc_lan_ingress classifies and hands the packet to its family's walker
 * (fc_lan_walk, fc_lan_walk6), which copies it to each SA of the LAN target list, a chunk per
 * tail call (forecast.h).
 *
 * A copy must go to the XFRM interface with the SA's mark: its transmit path routes the copy,
 * looks the policy up by (mark, if_id) and encrypts. Any other device sends it in clear or not
 * at all (docs/design.md). A mark-only SA's copy is queued for the daemon instead, which sends
 * it through the local output path (FC_SA_LOCAL_OUT). */
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

/* One chunk of the LAN list from cb[FC_CB_NEXT] on, then itself for the next chunk. `family`
 * is a constant in each walker below, so each is compiled with one selector test only. */
static __always_inline int fc_lan_walk_family(struct __sk_buff *skb, const u32 family)
{
	u32 zero = 0, gen = skb->cb[FC_CB_GEN], next = skb->cb[FC_CB_NEXT];
	u32 orig_mark = skb->cb[FC_CB_MARK], daddr = skb->cb[FC_CB_DADDR], len = skb->cb[FC_CB_LEN];
	u32 list_key = fc_list_key(gen, FC_LIST_LAN);
	struct fc_config *cfg = fc_config.lookup(&zero);
	u32 *count = fc_list_len.lookup(&list_key);
	u32 family_key = fc_family_key(family, FC_DIR_LAN_TO_SA);
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
		u32 key = fc_target_key(gen, FC_LIST_LAN, next + k);
		u32 *target, slot;
		struct fc_sa *sa;

		if (next + k >= end)
			break;
		target = fc_targets.lookup(&key);
		if (!target)
			break;
		slot = *target;
		sa = fc_sas.lookup(&slot);
		if (!sa || !(sa->flags & FC_SA_ACTIVE) ||
		    (family == FC_FAMILY_IPV6 ? !fc_sa_wants6(sa, daddr6) : !fc_sa_wants(sa, daddr)))
			continue;
		if (sa->flags & FC_SA_LOCAL_OUT) {
			u32 reason = fc_local_queue(local, sa->mark_out, slot);

			if (!reason) {
				fc_count(slot, FC_DIR_LAN_TO_SA, len);
				family_total->packets += 1;
				family_total->bytes += len;
			} else {
				u32 sa_key = fc_sa_drop_key(slot, FC_SA_DROP_LOCAL_OUT);

				fc_drop(reason);
				fc_drop_add(fc_sa_drops.lookup(&sa_key));
			}
			continue;
		}
		/* Without the barrier the verifier sees a modified ctx pointer (docs/design.md). */
		asm volatile("" : "+r"(skb));
		skb->mark = sa->mark_out;
		if (bpf_clone_redirect(skb, cfg->xfrm_ifindex, 0) == 0) {
			fc_count(slot, FC_DIR_LAN_TO_SA, len);
			family_total->packets += 1;
			family_total->bytes += len;
		} else {
			u32 sa_key = fc_sa_drop_key(slot, FC_SA_DROP_CLONE);

			fc_drop(FC_DROP_CLONE_TO_SA);
			fc_drop_add(fc_sa_drops.lookup(&sa_key));
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

int fc_lan_walk(struct __sk_buff *skb)
{
	return fc_lan_walk_family(skb, FC_FAMILY_IPV4);
}

int fc_lan_walk6(struct __sk_buff *skb)
{
	return fc_lan_walk_family(skb, FC_FAMILY_IPV6);
}

/* Hand the packet to its family's walker: one LAN token per packet however many copies it
 * makes, so the bucket bounds what the LAN can make the gateway encrypt (rate × SAs). */
static __always_inline int fc_lan_start(struct __sk_buff *skb, const struct fc_config *cfg,
					 u32 gen, u32 family, u32 daddr, u32 len)
{
	u32 lan_bucket = FC_BUCKET_LAN, zero = 0;
	/* One generation for the whole walk: the daemon only rewrites the other one. */
	u32 list_key = fc_list_key(gen, FC_LIST_LAN);
	u32 *count = fc_list_len.lookup(&list_key);

	if (!count || !*count)
		return TC_ACT_OK;
	if (!fc_rate_ok(fc_buckets.lookup(&lan_bucket), &cfg->lan_rate)) {
		fc_drop(FC_DROP_STORM_LAN);
		return TC_ACT_OK;
	}
	fc_local_save(skb, fc_local_scratch.lookup(&zero), cfg, ETH_HLEN, len, family);
	skb->cb[FC_CB_GEN] = gen;
	skb->cb[FC_CB_NEXT] = 0;
	skb->cb[FC_CB_MARK] = skb->mark;
	skb->cb[FC_CB_DADDR] = daddr;
	skb->cb[FC_CB_LEN] = len;
	fc_chain.call(skb, family);
	fc_drop(FC_DROP_CHAIN);
	return TC_ACT_OK;
}

static __always_inline int fc_lan_ingress6(struct __sk_buff *skb, const struct fc_config *cfg,
					    u32 gen)
{
	struct fc_ip6hdr ip6;

	if (fc_load_ip6(skb, ETH_HLEN, &ip6, 0) < 0) {
		fc_drop(FC_DROP_MALFORMED);
		return TC_ACT_OK;
	}
	if (!fc_is_multicast6(ip6.daddr))
		return TC_ACT_OK;
	if (!(fc_group6_dirs(cfg, ip6.daddr) & (1 << FC_DIR_LAN_TO_SA)))
		return TC_ACT_OK;
	if (fc_is_dhcp6(skb, ETH_HLEN, &ip6))
		return TC_ACT_OK;
	if (ip6.hop_limit == 0) {
		fc_drop(FC_DROP_TTL);
		return TC_ACT_OK;
	}
	return fc_lan_start(skb, cfg, gen, FC_FAMILY_IPV6, ETH_HLEN,
			    FC_IP6_HLEN + bpf_ntohs(ip6.payload_len));
}

int fc_lan_ingress(struct __sk_buff *skb)
{
	u32 zero = 0;
	struct fc_config *cfg = fc_config.lookup(&zero);
	u32 *gen = fc_gen.lookup(&zero);
	struct iphdr ip;
	u32 daddr;
	int bcast;

	if (!cfg || !gen || !cfg->xfrm_ifindex)
		return TC_ACT_OK;
	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(FC_ETH_P_IPV6))
		return TC_ACT_OK;
	/* A tagged frame belongs to another VLAN's interface; a frame for another host's MAC is
	 * one the gateway itself would not receive (promiscuous mode, a bridge port); a looped-back
	 * frame is the gateway's own multicast (its MLD and IGMP reports among them), handed back
	 * to it without a MAC header: not the LAN's traffic. */
	if (skb->vlan_present || skb->pkt_type == FC_PACKET_OTHERHOST ||
	    skb->pkt_type == FC_PACKET_LOOPBACK)
		return TC_ACT_OK;
	if (skb->protocol == bpf_htons(FC_ETH_P_IPV6))
		return fc_lan_ingress6(skb, cfg, *gen);
	if (fc_load_ip(skb, ETH_HLEN, &ip, 0) < 0) {
		fc_drop(FC_DROP_MALFORMED); /* the stack drops it too; counted to say why */
		return TC_ACT_OK;
	}
	daddr = ip.daddr;
	bcast = fc_is_broadcast(daddr, cfg);
	if (!bcast && !fc_is_multicast(daddr))
		return TC_ACT_OK;
	if (!(fc_group_dirs(cfg, daddr, bcast) & (1 << FC_DIR_LAN_TO_SA)))
		return TC_ACT_OK;
	if (fc_is_dhcp(skb, ETH_HLEN, &ip))
		return TC_ACT_OK;
	if (ip.ttl == 0) {
		fc_drop(FC_DROP_TTL);
		return TC_ACT_OK;
	}
	return fc_lan_start(skb, cfg, *gen, FC_FAMILY_IPV4, daddr, bpf_ntohs(ip.tot_len));
}
