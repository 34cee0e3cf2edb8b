/* Test witness on the stand-in XFRM interface's egress: counts every copy by its mark, then
 * takes it. TC_ACT_STOLEN reports a successful transmit to the sender and queues nothing, so
 * thousands of copies per packet are all seen (a veth peer's backlog would drop most). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

BPF_HASH(seen, u32, u64, 65536);

int witness(struct __sk_buff *skb)
{
	u32 mark = skb->mark;
	u64 zero = 0, *n = seen.lookup_or_try_init(&mark, &zero);

	if (n)
		__sync_fetch_and_add(n, 1);
	return TC_ACT_STOLEN;
}
