/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Service load balancing (bcc): VIP DNAT on the way out of the pod and
 * reverse NAT on replies.
 *
 * Invariants:
 *  - Slot 0 of {vip, port, proto} is the service (count, rev_nat_index);
 *    slots 1..count hold backend ids. count == 0 drops with DROP_NO_SERVICE.
 *  - The backend of a flow is chosen once (random slot) and stored in a
 *    CT_KEY_F_SERVICE conntrack entry keyed by the pre-DNAT tuple, so every
 *    later packet of the flow goes to the same backend while it exists.
 *  - The post-DNAT conntrack entry carries rev_nat_id; replies matching it
 *    get their source rewritten to the reverse-NAT {vip, port}.
 */
#ifndef CILIARY_LIB_LB_H
#define CILIARY_LIB_LB_H

#include "types.h"
#include "drop.h"
#include "pkt.h"
#include "conntrack.h"

struct lb_result {
	__be32 vip;
	__be16 vport;
	__u16 rev_nat_id;
};

/* Returns 1 when DNATed, 0 when the destination is no service, <0 drop. */
static __always_inline int lb4_local(struct __sk_buff *skb, struct pkt *p, __u64 now,
				     struct lb_result *res)
{
	struct lb4_key key = {};
	struct lb4_service *svc, *slot;
	struct lb4_backend *be = 0;
	struct ct_key ck = {};
	struct ct_entry *ce;
	__u32 backend_id = 0;
	int ret;

	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return 0;
	key.address = p->daddr;
	key.dport = p->dport;
	key.proto = p->proto;
	svc = map_lb4_service_lookup(&key);
	if (!svc)
		return 0;
	res->vip = p->daddr;
	res->vport = p->dport;
	res->rev_nat_id = svc->rev_nat_index;
	if (svc->count == 0)
		return -DROP_NO_SERVICE;

	ct_key_fwd(&ck, p, DIR_EGRESS);
	ck.flags |= CT_KEY_F_SERVICE;
	ce = map_ct_lookup(&ck);
	if (ce && ce->expires_ns > now) {
		backend_id = ce->backend_id;
		be = map_lb4_backend_lookup(&backend_id);
		if (be)
			ct_touch(ce, p, 0, now);
	}
	if (!be) {
		struct ct_entry ne = {};

		key.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
		slot = map_lb4_service_lookup(&key);
		if (!slot)
			return -DROP_NO_SERVICE;
		backend_id = slot->backend_id;
		be = map_lb4_backend_lookup(&backend_id);
		if (!be)
			return -DROP_NO_SERVICE;
		ne.created_ns = now;
		ne.backend_id = backend_id;
		ne.rev_nat_id = res->rev_nat_id;
		ne.flags = CT_F_SERVICE;
		ne.packets = 1;
		ne.bytes = p->len;
		ne.tx_tcp_flags = p->tcp_flags;
		ne.expires_ns = now + ct_lifetime(&ne, p->proto);
		if (map_ct_update(&ck, &ne) < 0)
			return -DROP_CT_CREATE_FAILED;
	}
	ret = pkt_rewrite(skb, p, 0, be->address, be->port);
	if (ret < 0)
		return ret;
	return 1;
}

/* Rewrite a reply's source back to the service frontend. */
static __always_inline int lb4_rev_nat(struct __sk_buff *skb, struct pkt *p,
				       __u16 rev_nat_id, struct lb_result *res)
{
	struct lb4_reverse_nat_key k = {};
	struct lb4_reverse_nat *nat;

	k.rev_nat_id = rev_nat_id;
	nat = map_lb4_rev_nat_lookup(&k);
	if (!nat)
		return 0;
	res->vip = nat->address;
	res->vport = nat->port;
	res->rev_nat_id = rev_nat_id;
	return pkt_rewrite(skb, p, 1, nat->address, nat->port);
}

#endif /* CILIARY_LIB_LB_H */
