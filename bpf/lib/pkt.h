/* SPDX-License-Identifier: Apache-2.0 */
/*
 * IPv4 parsing into a struct pkt and in-place address/port rewriting (bcc).
 *
 * Invariants:
 *  - Headers are copied with bpf_skb_load_bytes, so no packet pointer is held
 *    across helpers that modify the packet.
 *  - ICMP echo is given ports so that request and reply reverse to each other:
 *    request (id, 0), reply (0, id). ICMP errors (destination unreachable, time
 *    exceeded, parameter problem) are CT_RELATED; every other ICMP type has
 *    ports (0, 0) and is tracked and policed like any other flow.
 *  - icmp_type / icmp_code hold the ICMP header's type and code (0 for other
 *    protocols): policy keys ICMP by type (lib/policy.h), flow events carry both.
 *  - Every rewrite updates the L3 checksum and the L4 checksum (including the
 *    pseudo header) with bpf_l3_csum_replace/bpf_l4_csum_replace.
 */
#ifndef CILIARY_LIB_PKT_H
#define CILIARY_LIB_PKT_H

#include "types.h"
#include "drop.h"

#define TCP_FLAG_FIN	0x01
#define TCP_FLAG_SYN	0x02
#define TCP_FLAG_RST	0x04
#define TCP_FLAG_ACK	0x10

#define IP_OFF		ETH_HLEN
#define IP_CSUM_OFF	(ETH_HLEN + __builtin_offsetof(struct iphdr, check))
#define IP_SADDR_OFF	(ETH_HLEN + __builtin_offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF	(ETH_HLEN + __builtin_offsetof(struct iphdr, daddr))

struct pkt {
	__u32 l4_off;
	__u32 len;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u8 related;		/* ICMP error */
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 pad[3];
};

static __always_inline int pkt_parse(struct __sk_buff *skb, struct pkt *p)
{
	struct iphdr ip;
	__u8 l4[16];

	if (bpf_skb_load_bytes(skb, IP_OFF, &ip, sizeof(ip)) < 0)
		return -DROP_INVALID;
	if (ip.version != 4 || ip.ihl < 5)
		return -DROP_INVALID;
	if (ip.frag_off & bpf_htons(0x1fff))
		return -DROP_FRAG_NOSUPPORT;

	p->l4_off = IP_OFF + ip.ihl * 4;
	p->len = skb->len;
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->proto = ip.protocol;
	p->sport = 0;
	p->dport = 0;
	p->tcp_flags = 0;
	p->related = 0;
	p->icmp_type = 0;
	p->icmp_code = 0;

	switch (ip.protocol) {
	case IPPROTO_TCP:
		if (bpf_skb_load_bytes(skb, p->l4_off, l4, 14) < 0)
			return -DROP_CT_INVALID_HDR;
		p->sport = *(__be16 *)&l4[0];
		p->dport = *(__be16 *)&l4[2];
		p->tcp_flags = l4[13];
		break;
	case IPPROTO_UDP:
		if (bpf_skb_load_bytes(skb, p->l4_off, l4, 8) < 0)
			return -DROP_CT_INVALID_HDR;
		p->sport = *(__be16 *)&l4[0];
		p->dport = *(__be16 *)&l4[2];
		break;
	case IPPROTO_ICMP:
		if (bpf_skb_load_bytes(skb, p->l4_off, l4, 8) < 0)
			return -DROP_CT_INVALID_HDR;
		p->icmp_type = l4[0];
		p->icmp_code = l4[1];
		switch (l4[0]) {
		case ICMP_ECHO:
			p->sport = *(__be16 *)&l4[4];
			break;
		case ICMP_ECHOREPLY:
			p->dport = *(__be16 *)&l4[4];
			break;
		case ICMP_DEST_UNREACH:
		case ICMP_TIME_EXCEEDED:
		case ICMP_PARAMETERPROB:
			p->related = 1;
			break;
		default:
			break;
		}
		break;
	default:
		break;
	}
	return 0;
}

static __always_inline __u32 l4_csum_off(const struct pkt *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? 16 : 6);
}

/* Rewrite the source (src=1) or destination address and port in place. */
static __always_inline int pkt_rewrite(struct __sk_buff *skb, struct pkt *p,
				       int src, __be32 new_addr, __be16 new_port)
{
	__be32 old_addr = src ? p->saddr : p->daddr;
	__be16 old_port = src ? p->sport : p->dport;
	__u32 addr_off = src ? IP_SADDR_OFF : IP_DADDR_OFF;
	__u32 port_off = p->l4_off + (src ? 0 : 2);
	int l4 = p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP;
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (old_addr != new_addr) {
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, 4) < 0)
			return -DROP_CSUM_L3;
		if (l4 && bpf_l4_csum_replace(skb, l4_csum_off(p), old_addr, new_addr,
					      BPF_F_PSEUDO_HDR | mangled | 4) < 0)
			return -DROP_CSUM_L4;
		if (bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) < 0)
			return -DROP_WRITE_ERROR;
	}
	if (l4 && old_port != new_port) {
		if (bpf_l4_csum_replace(skb, l4_csum_off(p), old_port, new_port,
					mangled | 2) < 0)
			return -DROP_CSUM_L4;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
			return -DROP_WRITE_ERROR;
	}
	if (src) {
		p->saddr = new_addr;
		p->sport = new_port;
	} else {
		p->daddr = new_addr;
		p->dport = new_port;
	}
	return 0;
}

#endif /* CILIARY_LIB_PKT_H */
