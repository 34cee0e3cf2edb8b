/* Where the IPv4 header is, and whether its destination is one we forward. */
#ifndef FC_CLASSIFY_H
#define FC_CLASSIFY_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

#include "forecast.h"

/* <uapi/linux/in.h> drags kernel headers in under bcc; one number is all that is needed. */
#define FC_IPPROTO_UDP 17
#define FC_PACKET_OTHERHOST 3 /* <linux/if_packet.h>: a frame for another host's MAC */
#define FC_IP_OFFSET 0x1fff   /* fragment offset bits of frag_off, host order */
#define FC_MCAST_NET 0xe0000000U  /* 224.0.0.0/4, host order */
#define FC_MCAST_MASK 0xf0000000U

static __always_inline int fc_is_multicast(__u32 daddr)
{
	return (bpf_ntohl(daddr) & FC_MCAST_MASK) == FC_MCAST_NET;
}

static __always_inline int fc_is_broadcast(__u32 daddr, const struct fc_config *cfg)
{
	return daddr == 0xffffffffU || (cfg->lan_broadcast && daddr == cfg->lan_broadcast);
}

/* DHCP is never forwarded (as the plugin): a relay's job, and a loop risk. A later fragment
 * has no UDP header to tell; it is forwarded like any fragment of a multicast/broadcast
 * datagram (its receiver reassembles or drops it). */
static __always_inline int fc_is_dhcp(struct __sk_buff *skb, __u32 l3, const struct iphdr *ip)
{
	struct udphdr udp;
	__u32 l4 = l3 + ip->ihl * 4;

	if (ip->protocol != FC_IPPROTO_UDP || (bpf_ntohs(ip->frag_off) & FC_IP_OFFSET))
		return 0;
	if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) < 0)
		return 0;
	return udp.dest == bpf_htons(67) || udp.dest == bpf_htons(68);
}

/* Copy the IPv4 header at offset l3 into *ip; 0 when it is a complete IPv4 header. `exact`:
 * its total length must end exactly at the end of the packet (used to find the header when its
 * offset is unknown); otherwise trailing bytes are allowed (Ethernet padding before ip_rcv). */
static __always_inline int fc_load_ip(struct __sk_buff *skb, __u32 l3, struct iphdr *ip, int exact)
{
	__u32 end;

	if (bpf_skb_load_bytes(skb, l3, ip, sizeof(*ip)) < 0)
		return -1;
	if (ip->version != 4 || ip->ihl < 5 || ip->ihl * 4 > bpf_ntohs(ip->tot_len))
		return -1;
	end = bpf_ntohs(ip->tot_len) + l3;
	if (end > skb->len || (exact && end != skb->len))
		return -1;
	return 0;
}

/* Is daddr inside one of this SA's remote traffic selectors? */
static __always_inline int fc_sa_wants(const struct fc_sa *sa, __u32 daddr)
{
#pragma unroll
	for (int t = 0; t < FC_MAX_TS; t++) {
		if (t >= sa->n_ts)
			break;
		if ((daddr & sa->ts[t].mask) == sa->ts[t].addr)
			return 1;
	}
	return 0;
}

#endif
