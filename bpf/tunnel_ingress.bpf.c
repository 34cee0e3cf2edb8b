/* XFRM-interface ingress (decrypted traffic): a client's multicast/broadcast → one copy to the
 * LAN (multicast or broadcast MAC) and one to every other SA that takes reinjected traffic;
 * never back to the origin. The original continues to the gateway's own stack. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "lib/maps.h"
#include "lib/classify.h"

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

static __always_inline void fc_copy_to_lan(struct __sk_buff *skb, const struct fc_config *cfg,
					   u32 l3, __u32 daddr, u32 origin, u32 len)
{
	struct fc_eth eth = {};
	__u32 host = bpf_ntohl(daddr);

	if (l3 == 0 && bpf_skb_change_head(skb, ETH_HLEN, 0) < 0) {
		fc_drop(FC_DROP_NO_HEADROOM);
		return;
	}
	if (fc_is_multicast(daddr)) {
		eth.dst[0] = 0x01;
		eth.dst[1] = 0x00;
		eth.dst[2] = 0x5e;
		eth.dst[3] = (host >> 16) & 0x7f;
		eth.dst[4] = (host >> 8) & 0xff;
		eth.dst[5] = host & 0xff;
	} else {
		__builtin_memset(eth.dst, 0xff, ETH_ALEN);
	}
	__builtin_memcpy(eth.src, cfg->lan_mac, ETH_ALEN);
	eth.proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0) {
		fc_drop(FC_DROP_NO_HEADROOM);
		return;
	}
	asm volatile("" : "+r"(skb));
	skb->mark = 0;
	if (bpf_clone_redirect(skb, cfg->lan_ifindex, 0) == 0)
		fc_count(origin, FC_DIR_SA_TO_LAN, len);
	else
		fc_drop(FC_DROP_CLONE_TO_LAN);
}

int fc_tunnel_ingress(struct __sk_buff *skb)
{
	u32 zero = 0;
	struct fc_config *cfg = fc_config.lookup(&zero);
	struct iphdr ip;
	u32 l3, daddr, len, origin, orig_mark;

	if (!cfg || skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (fc_find_ip(skb, &ip, &l3) < 0) {
		fc_drop(FC_DROP_MALFORMED);
		return TC_ACT_OK;
	}
	daddr = ip.daddr;
	if (!fc_is_multicast(daddr) && !fc_is_broadcast(daddr, cfg))
		return TC_ACT_OK;
	if (fc_is_dhcp(skb, l3, &ip))
		return TC_ACT_OK;
	orig_mark = skb->mark;
	origin = fc_origin(orig_mark);
	if (origin >= FC_MAX_SAS) {
		fc_drop(FC_DROP_UNKNOWN_ORIGIN);
		return TC_ACT_OK;
	}
	len = bpf_ntohs(ip.tot_len);

	/* The LAN copy first: the header offset is dead after it, so the verifier walks the SA
	 * loop below once instead of once per offset. */
	if (cfg->lan_ifindex)
		fc_copy_to_lan(skb, cfg, l3, daddr, origin, len);

	for (u32 slot = 0; slot < FC_MAX_SAS; slot++) {
		u32 key = slot;
		struct fc_sa *sa = fc_sas.lookup(&key);

		/* The origin is skipped by its mark, not by `slot == origin`: that test would pin
		 * origin to a constant in every "equal" branch and make the verifier walk the rest
		 * of the loop once per slot (quadratic, past its budget). */
		if (!sa || !(sa->flags & FC_SA_ACTIVE) || sa->mark_in == orig_mark ||
		    !(sa->flags & FC_SA_REINJECT) || !fc_sa_wants(sa, daddr))
			continue;
		asm volatile("" : "+r"(skb));
		skb->mark = sa->mark_out;
		if (bpf_clone_redirect(skb, cfg->xfrm_ifindex, 0) == 0)
			fc_count(slot, FC_DIR_SA_TO_SA, len);
		else
			fc_drop(FC_DROP_CLONE_TO_SA);
	}
	asm volatile("" : "+r"(skb));
	skb->mark = orig_mark;
	return TC_ACT_OK;
}
