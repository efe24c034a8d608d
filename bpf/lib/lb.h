/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Service load balancing (bcc): VIP DNAT on the way out of the pod and
 * reverse NAT on replies; backend selection shared with the host programs
 * (lib/nodeport.h).
 *
 * Invariants:
 *  - Slot 0 of {vip, port, proto} is the service (count, rev_nat_index,
 *    flags, flags2, affinity timeout in backend_id); slots 1..count hold
 *    backend ids. count == 0 drops with DROP_NO_SERVICE.
 *  - The backend of a flow is chosen once and stored in a CT_KEY_F_SERVICE
 *    conntrack entry keyed by the pre-DNAT tuple, so every later packet of the
 *    flow goes to the same backend while it exists.
 *  - A new flow's backend is, in order: the client's affinity entry (flag
 *    SVC_FLAG_AFFINITY, entry younger than the timeout, {backend, service} in
 *    ciliary_lb_affinity_match); the Maglev table entry
 *    {rev_nat_id, jhash(5-tuple) % LB_MAGLEV_TABLE_SIZE} (flag
 *    SVC_FLAG2_MAGLEV); else a random slot (also the fallback when the Maglev
 *    entry is missing). With affinity the choice is recorded for the client.
 *  - The post-DNAT conntrack entry carries rev_nat_id; replies matching it
 *    get their source rewritten to the reverse-NAT {vip, port}.
 */
#ifndef CILIARY_LIB_LB_H
#define CILIARY_LIB_LB_H

#include "types.h"
#include "drop.h"
#include "pkt.h"
#include "conntrack.h"
#include "jhash.h"

struct lb_result {
	__be32 vip;
	__be16 vport;
	__u16 rev_nat_id;
	__u32 backend_id;
	__u8 svc_flags;		/* slot 0 flags */
	__u8 new_flow;		/* the backend was chosen now */
	__u8 ct_flags;		/* flags of the existing service entry */
	__u8 pad;
};

/* Maglev hash of a flow (Cilium's hash_from_tuple_v4: the VIP is implied by
 * the per-service table). Ports are the raw __be16 field values. */
static __always_inline __u32 lb4_hash(const struct pkt *p)
{
	return jhash_3words(p->saddr, ((__u32)p->dport << 16) | p->sport, p->proto,
			    LB_MAGLEV_SEED);
}

/* Choose a backend for a new flow. key is the service's slot-0 key (its slot
 * is overwritten). Returns the backend or 0. */
static __always_inline struct lb4_backend *lb4_pick(const struct pkt *p, struct lb4_key *key,
						    const struct lb4_service *svc, __u64 now,
						    __u32 *out_id)
{
	struct lb4_affinity_key ak = {};
	struct lb_affinity_val nv = {};
	struct lb4_service *slot;
	struct lb4_backend *be = 0;
	__u32 backend_id = 0;
	__u16 rev = svc->rev_nat_index;
	__u32 timeout = svc->backend_id;
	__u16 count = svc->count;
	int affinity = (svc->flags & SVC_FLAG_AFFINITY) && timeout;
	int maglev = svc->flags2 & SVC_FLAG2_MAGLEV;

	ak.client_ip = p->saddr;
	ak.rev_nat_id = rev;
	if (affinity) {
		struct lb_affinity_val *av = map_affinity_lookup(&ak);

		if (av && av->last_used + (__u64)timeout * CILIARY_NSEC_PER_SEC > now) {
			struct lb_affinity_match_key mk = {};

			mk.backend_id = av->backend_id;
			mk.rev_nat_id = rev;
			if (map_affinity_match_lookup(&mk)) {
				backend_id = mk.backend_id;
				be = map_lb4_backend_lookup(&backend_id);
			}
		}
	}
	if (!be && maglev) {
		struct lb4_maglev_key gk = {};
		struct lb4_maglev_value *gv;

		gk.rev_nat_id = rev;
		gk.index = lb4_hash(p) % LB_MAGLEV_TABLE_SIZE;
		gv = map_maglev_lookup(&gk);
		if (gv) {
			backend_id = gv->backend_id;
			be = map_lb4_backend_lookup(&backend_id);
		}
	}
	if (!be) {
		if (count == 0)
			return 0;
		key->backend_slot = (bpf_get_prandom_u32() % count) + 1;
		slot = map_lb4_service_lookup(key);
		if (!slot)
			return 0;
		backend_id = slot->backend_id;
		be = map_lb4_backend_lookup(&backend_id);
		if (!be)
			return 0;
	}
	if (affinity) {
		nv.last_used = now;
		nv.backend_id = backend_id;
		map_affinity_update(&ak, &nv);
	}
	*out_id = backend_id;
	return be;
}

/* The service of p's destination and the backend of this flow: the one stored
 * in the service entry {tuple, key_flags} if it is alive, else a new choice
 * (res->new_flow; the caller creates the entry with lb4_ct_create_service).
 * Returns 1 with *out set, 0 when the destination is no service, <0 drop. */
static __always_inline int lb4_resolve(const struct pkt *p, __u64 now, __u8 key_flags,
				       struct lb_result *res, struct lb4_backend **out)
{
	struct lb4_key key = {};
	struct lb4_service *svc;
	struct lb4_backend *be = 0;
	struct ct_key ck = {};
	struct ct_entry *ce;
	__u32 backend_id = 0;

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
	res->svc_flags = svc->flags;
	if (svc->count == 0)
		return -DROP_NO_SERVICE;

	ct_key_fwd(&ck, p, 0);
	ck.flags = key_flags;
	ce = map_ct_lookup(&ck);
	if (ce && ce->expires_ns > now) {
		backend_id = ce->backend_id;
		be = map_lb4_backend_lookup(&backend_id);
		if (be) {
			ct_touch(ce, p, 0, now);
			res->ct_flags = ce->flags;
		}
	}
	if (!be) {
		be = lb4_pick(p, &key, svc, now, &backend_id);
		if (!be)
			return -DROP_NO_SERVICE;
		res->new_flow = 1;
	}
	res->backend_id = backend_id;
	*out = be;
	return 1;
}

static __always_inline int lb4_ct_create_service(const struct pkt *p, __u64 now, __u8 key_flags,
						 const struct lb_result *res, __u8 flags)
{
	struct ct_key ck = {};
	struct ct_entry ne = {};

	ct_key_fwd(&ck, p, 0);
	ck.flags = key_flags;
	ne.created_ns = now;
	ne.backend_id = res->backend_id;
	ne.rev_nat_id = res->rev_nat_id;
	ne.flags = CT_F_SERVICE | flags;
	ne.packets = 1;
	ne.bytes = p->len;
	ne.tx_tcp_flags = p->tcp_flags;
	ne.expires_ns = now + ct_lifetime(&ne, p->proto);
	if (map_ct_update(&ck, &ne) < 0)
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

/* Returns 1 when DNATed, 0 when the destination is no service, <0 drop. */
static __always_inline int lb4_local(struct __sk_buff *skb, struct pkt *p, __u64 now,
				     struct lb_result *res)
{
	struct lb4_backend *be = 0;
	__be32 addr;
	__be16 port;
	int ret;

	ret = lb4_resolve(p, now, DIR_EGRESS | CT_KEY_F_SERVICE, res, &be);
	if (ret <= 0)
		return ret;
	addr = be->address;
	port = be->port;
	if (res->new_flow) {
		ret = lb4_ct_create_service(p, now, DIR_EGRESS | CT_KEY_F_SERVICE, res, 0);
		if (ret < 0)
			return ret;
	}
	ret = pkt_rewrite(skb, p, 0, addr, port);
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
	__be32 addr;
	__be16 port;

	k.rev_nat_id = rev_nat_id;
	nat = map_lb4_rev_nat_lookup(&k);
	if (!nat)
		return 0;
	addr = nat->address;
	port = nat->port;
	res->vip = addr;
	res->vport = port;
	res->rev_nat_id = rev_nat_id;
	return pkt_rewrite(skb, p, 1, addr, port);
}

#endif /* CILIARY_LIB_LB_H */
