/* Where the IPv4 or IPv6 header is, and whether its destination is one we forward. */
#ifndef FC_CLASSIFY_H
#define FC_CLASSIFY_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

#include "forecast.h"

/* <uapi/linux/in.h> drags kernel headers in under bcc; one number is all that is needed. */
#define FC_IPPROTO_UDP 17
#define FC_PACKET_OTHERHOST 3 /* <linux/if_packet.h>: a frame for another host's MAC */
#define FC_PACKET_LOOPBACK 5  /* the gateway's own multicast/broadcast, looped back to it */
#define FC_IP_OFFSET 0x1fff   /* fragment offset bits of frag_off, host order */
#define FC_MCAST_NET 0xe0000000U  /* 224.0.0.0/4, host order */
#define FC_MCAST_MASK 0xf0000000U
#define FC_ETH_P_IPV6 0x86DD
#define FC_IP6_HLEN 40

/* The fixed IPv6 header, spelled out: <uapi/linux/ipv6.h> pulls in more than bcc digests. */
struct fc_ip6hdr {
	__u8 ver_tc;  /* version in the high nibble */
	__u8 tc_flow[3];
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u32 saddr[4];
	__u32 daddr[4];
};

/* Was this packet decrypted by an SA (has it a secpath)? What the tunnel program takes from a
 * device other than the XFRM interface: the WAN device, where mark-only SAs' traffic arrives. */
static __always_inline int fc_decrypted(struct __sk_buff *skb)
{
	struct bpf_xfrm_state x;

	return bpf_skb_get_xfrm_state(skb, 0, &x, sizeof(x), 0) == 0;
}

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

/* Copy the IPv6 header at offset l3 into *ip6; 0 when it is a whole IPv6 packet (a jumbogram,
 * payload length 0, is not one: nothing on a LAN or in a tunnel sends them). `exact` as in
 * fc_load_ip. */
static __always_inline int fc_load_ip6(struct __sk_buff *skb, __u32 l3, struct fc_ip6hdr *ip6,
				       int exact)
{
	__u32 end;

	if (bpf_skb_load_bytes(skb, l3, ip6, sizeof(*ip6)) < 0)
		return -1;
	if ((ip6->ver_tc >> 4) != 6 || !ip6->payload_len)
		return -1;
	end = FC_IP6_HLEN + bpf_ntohs(ip6->payload_len) + l3;
	if (end > skb->len || (exact && end != skb->len))
		return -1;
	return 0;
}

static __always_inline int fc_is_multicast6(const __u32 *daddr)
{
	return (daddr[0] & bpf_htonl(0xff000000U)) == bpf_htonl(0xff000000U);
}

/* DHCPv6 (UDP 546/547) is never forwarded, as DHCP. Only a UDP header right after the fixed
 * header is looked at: DHCPv6 carries no extension headers. */
static __always_inline int fc_is_dhcp6(struct __sk_buff *skb, __u32 l3,
				       const struct fc_ip6hdr *ip6)
{
	struct udphdr udp;

	if (ip6->nexthdr != FC_IPPROTO_UDP)
		return 0;
	if (bpf_skb_load_bytes(skb, l3 + FC_IP6_HLEN, &udp, sizeof(udp)) < 0)
		return 0;
	return udp.dest == bpf_htons(546) || udp.dest == bpf_htons(547);
}

/* Is the IPv6 destination inside one of this SA's remote IPv6 traffic selectors? */
static __always_inline int fc_sa_wants6(const struct fc_sa *sa, const __u32 *daddr)
{
#pragma unroll
	for (int t = 0; t < FC_MAX_TS; t++) {
		const struct fc_ts6 *ts = &sa->ts6[t];

		if (t >= sa->n_ts6)
			break;
		if ((daddr[0] & ts->mask[0]) == ts->addr[0] && (daddr[1] & ts->mask[1]) == ts->addr[1] &&
		    (daddr[2] & ts->mask[2]) == ts->addr[2] && (daddr[3] & ts->mask[3]) == ts->addr[3])
			return 1;
	}
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
