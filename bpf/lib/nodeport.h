/* SPDX-License-Identifier: Apache-2.0 */
/*
 * NodePort / externalIPs from outside the node (bcc): the host programs on
 * the node's underlay interface.
 *
 *   from_netdev  tc ingress: service lookup + DNAT (+ SNAT) of new flows,
 *                reverse translation of replies of SNATed flows.
 *   to_netdev    tc egress: reverse DNAT of replies from local backends.
 *
 * Invariants:
 *  - Only packets whose destination is a frontend in ciliary_lb4_services, or
 *    that answer a flow translated here, are touched; everything else passes
 *    (TC_ACT_OK) without a metric or event.
 *  - The backend of a flow is chosen like in from_container (affinity,
 *    Maglev, random) and pinned in a service conntrack entry keyed by the
 *    pre-DNAT tuple with CT_KEY_F_SERVICE | CT_KEY_F_HOST.
 *  - A backend whose route leaves through another interface (a local pod)
 *    is reached without SNAT: the client address is kept, a post-DNAT entry
 *    {client -> backend, CT_KEY_F_HOST} carries rev_nat_id, and to_netdev
 *    rewrites the reply's source back to the frontend.
 *  - A backend behind the interface the request arrived on (another node) is
 *    reached with SNAT to the node's address for that route (FIB source) and
 *    a port from NODEPORT_SNAT_MIN..MAX; ciliary_nat4 holds both directions.
 *    Translated packets are sent with bpf_redirect_neigh (their source is a
 *    local address, which the kernel's forwarding path would drop as martian).
 *  - The NAT entries live as long as the service conntrack entry (TCP state
 *    included); replies refresh it.
 *  - Metrics and events use direction DIR_SERVICE (3) and ep_id 0.
 */
#ifndef CILIARY_LIB_NODEPORT_H
#define CILIARY_LIB_NODEPORT_H

#include "types.h"
#include "drop.h"
#include "pkt.h"
#include "conntrack.h"
#include "events.h"
#include "lb.h"

#define CILIARY_AF_INET			2
#define CILIARY_FIB_LOOKUP_OUTPUT	(1U << 1)
#define CILIARY_FIB_LOOKUP_SRC		(1U << 4)	/* kernel >= 6.7 */
#define CILIARY_FIB_RET_SUCCESS		0
#define CILIARY_FIB_RET_NO_NEIGH	7
#define NODEPORT_SNAT_TRIES		8

/* The 4-argument form (kernel >= 5.11); bcc's helpers.h declares an older one. */
static long (*ciliary_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

#define HOST_SVC_KEY	(CT_KEY_F_SERVICE | CT_KEY_F_HOST)

/* Output interface for daddr (0 when there is no usable route). With want_src,
 * *src is the source address the node would use for it. */
static __always_inline __u32 nodeport_fib(struct __sk_buff *skb, __be32 daddr, __u8 proto,
					  int want_src, __be32 *src)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib.family = CILIARY_AF_INET;
	fib.l4_protocol = proto;
	fib.ifindex = skb->ifindex;
	fib.ipv4_dst = daddr;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib),
			    CILIARY_FIB_LOOKUP_OUTPUT | (want_src ? CILIARY_FIB_LOOKUP_SRC : 0));
	if (rc != CILIARY_FIB_RET_SUCCESS && rc != CILIARY_FIB_RET_NO_NEIGH)
		return 0;
	if (want_src)
		*src = fib.ipv4_src;
	return fib.ifindex;
}

/* Send a translated packet out of the interface of its route. */
static __always_inline int nodeport_redirect(struct __sk_buff *skb, const struct pkt *p)
{
	__be32 unused = 0;
	__u32 oif = nodeport_fib(skb, p->daddr, p->proto, 0, &unused);

	if (!oif)
		return -DROP_NO_FIB;
	return ciliary_redirect_neigh(oif, 0, 0, 0);
}

static __always_inline void nat_key(struct ct_key *k, __be32 saddr, __be32 daddr, __be16 sport,
				    __be16 dport, __u8 proto, __u8 flags)
{
	k->saddr = saddr;
	k->daddr = daddr;
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->flags = flags;
	k->pad = 0;
}

/* A reply to a SNATed flow: {backend -> node:snat port} becomes
 * {frontend -> client}. Returns 1 when translated, 0 when not such a reply. */
static __always_inline int nodeport_rev_snat(struct __sk_buff *skb, struct pkt *p, __u64 now,
					     struct lb_result *res)
{
	struct lb4_reverse_nat_key rk = {};
	struct lb4_reverse_nat *fe;
	struct nat4_entry *n;
	struct ct_entry *ce;
	struct ct_key k = {};
	__be32 caddr, fe_addr;
	__be16 cport, fe_port;
	__u16 rev_nat_id;
	int ret;

	nat_key(&k, p->saddr, p->daddr, p->sport, p->dport, p->proto, NAT_KEY_REV);
	n = map_nat_lookup(&k);
	if (!n || n->expires_ns <= now)
		return 0;
	caddr = n->addr;
	cport = n->port;
	rev_nat_id = n->rev_nat_id;
	rk.rev_nat_id = rev_nat_id;
	fe = map_lb4_rev_nat_lookup(&rk);
	if (!fe)
		return 0;
	fe_addr = fe->address;
	fe_port = fe->port;

	/* The service entry {client -> frontend} tracks the connection's state. */
	nat_key(&k, caddr, fe_addr, cport, fe_port, p->proto, HOST_SVC_KEY);
	ce = map_ct_lookup(&k);
	if (ce) {
		ct_touch(ce, p, 1, now);
		n->expires_ns = ce->expires_ns;
	}
	res->vip = fe_addr;
	res->vport = fe_port;
	res->rev_nat_id = rev_nat_id;
	ret = pkt_rewrite(skb, p, 0, caddr, cport);
	if (ret < 0)
		return ret;
	ret = pkt_rewrite(skb, p, 1, fe_addr, fe_port);
	if (ret < 0)
		return ret;
	return 1;
}

/* SNAT state of a flow {client -> frontend} to backend baddr:bport: reuse the
 * forward entry, else allocate a port and write both entries. */
static __always_inline int nodeport_snat_state(struct __sk_buff *skb, const struct pkt *p,
					       __be32 baddr, __be16 bport, __u16 rev_nat_id,
					       __u64 now, __u64 expires, __be32 *snat_addr,
					       __be16 *snat_port)
{
	struct nat4_entry fwd = {}, rev = {};
	struct nat4_entry *n;
	struct ct_key fk = {}, rk = {};
	__be32 src = 0;
	__be16 port = 0;
	int i, found = 0;

	nat_key(&fk, p->saddr, p->daddr, p->sport, p->dport, p->proto, NAT_KEY_FWD);
	n = map_nat_lookup(&fk);
	if (n && n->addr) {
		*snat_addr = n->addr;
		*snat_port = n->port;
		n->expires_ns = expires;
		nat_key(&rk, baddr, n->addr, bport, n->port, p->proto, NAT_KEY_REV);
		n = map_nat_lookup(&rk);
		if (n) {
			n->expires_ns = expires;
			return 0;
		}
		src = *snat_addr;
		port = *snat_port;
		found = 1;
	}
	if (!found) {
		if (!nodeport_fib(skb, baddr, p->proto, 1, &src) || !src)
			src = p->daddr;	/* no FIB source: the frontend (a node address) */
#pragma unroll
		for (i = 0; i < NODEPORT_SNAT_TRIES; i++) {
			port = bpf_htons(NODEPORT_SNAT_MIN +
					 bpf_get_prandom_u32() % (NODEPORT_SNAT_MAX - NODEPORT_SNAT_MIN + 1));
			nat_key(&rk, baddr, src, bport, port, p->proto, NAT_KEY_REV);
			n = map_nat_lookup(&rk);
			if (!n || n->expires_ns <= now) {
				found = 1;
				break;
			}
		}
		if (!found)
			return -DROP_NAT_NO_MAPPING;
	}
	fwd.expires_ns = expires;
	fwd.addr = src;
	fwd.port = port;
	fwd.rev_nat_id = rev_nat_id;
	rev.expires_ns = expires;
	rev.addr = p->saddr;
	rev.port = p->sport;
	rev.rev_nat_id = rev_nat_id;
	nat_key(&rk, baddr, src, bport, port, p->proto, NAT_KEY_REV);
	if (map_nat_update(&rk, &rev) < 0 || map_nat_update(&fk, &fwd) < 0)
		return -DROP_CT_CREATE_FAILED;
	*snat_addr = src;
	*snat_port = port;
	return 0;
}

#endif /* CILIARY_LIB_NODEPORT_H */
