/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking over ciliary_ct4_global (bcc).
 *
 * Invariants:
 *  - An entry is keyed by the tuple of the packet that created it plus the
 *    direction of the hook that created it, so the egress hook of the client
 *    and the ingress hook of the server (same node, same map) track the flow
 *    independently and each enforces its own policy.
 *  - A packet of direction D matches {tuple, D} as CT_ESTABLISHED or
 *    {reversed tuple, opposite(D)} as CT_REPLY; otherwise it is CT_NEW.
 *  - An entry whose expires_ns has passed is treated as absent and is
 *    overwritten; userspace GC (gc_conntrack) deletes such entries.
 */
#ifndef CILIARY_LIB_CONNTRACK_H
#define CILIARY_LIB_CONNTRACK_H

#include "config.h"
#include "types.h"
#include "pkt.h"

/* Key of a packet's tuple (``reverse``: as seen from the other end) with ``flags``. */
static __always_inline void ct_key_set(struct ct_key *k, const struct pkt *p, __u8 flags,
				       int reverse)
{
	k->saddr = reverse ? p->daddr : p->saddr;
	k->daddr = reverse ? p->saddr : p->daddr;
	k->sport = reverse ? p->dport : p->sport;
	k->dport = reverse ? p->sport : p->dport;
	k->proto = p->proto;
	k->flags = flags;
	k->pad = 0;
}

static __always_inline void ct_key_fwd(struct ct_key *k, const struct pkt *p, __u8 dir)
{
	ct_key_set(k, p, dir, 0);
}

static __always_inline void ct_key_rev(struct ct_key *k, const struct pkt *p, __u8 dir)
{
	ct_key_set(k, p, DIR_INGRESS + DIR_EGRESS - dir, 1);
}

static __always_inline __u64 ct_lifetime(const struct ct_entry *e, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return CT_LIFETIME_NONTCP * CILIARY_NSEC_PER_SEC;
	if ((e->flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING)) ==
	    (CT_F_TX_CLOSING | CT_F_RX_CLOSING))
		return CT_CLOSE_TIMEOUT * CILIARY_NSEC_PER_SEC;
	if (!(e->flags & CT_F_SEEN_REPLY))
		return CT_SYN_TIMEOUT * CILIARY_NSEC_PER_SEC;
	return CT_LIFETIME_TCP * CILIARY_NSEC_PER_SEC;
}

static __always_inline __u64 ct_lifetime_default(__u8 proto)
{
	return (proto == IPPROTO_TCP ? CT_SYN_TIMEOUT : CT_LIFETIME_NONTCP) * CILIARY_NSEC_PER_SEC;
}

/* Account one packet on an entry and refresh its expiry. */
static __always_inline void ct_touch(struct ct_entry *e, const struct pkt *p,
				     int reply, __u64 now)
{
	__u8 flags = e->flags;

	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, p->len);
	if (reply) {
		flags |= CT_F_SEEN_REPLY;
		e->rx_tcp_flags |= p->tcp_flags;
		if (p->tcp_flags & TCP_FLAG_FIN)
			flags |= CT_F_RX_CLOSING;
	} else {
		e->tx_tcp_flags |= p->tcp_flags;
		if (p->tcp_flags & TCP_FLAG_FIN)
			flags |= CT_F_TX_CLOSING;
	}
	if (p->tcp_flags & TCP_FLAG_RST)
		flags |= CT_F_TX_CLOSING | CT_F_RX_CLOSING;
	/* A SYN on a closing entry is a new connection reusing the tuple. */
	if (!reply && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		flags &= ~(CT_F_TX_CLOSING | CT_F_RX_CLOSING | CT_F_SEEN_REPLY);
	e->flags = flags;
	e->expires_ns = now + ct_lifetime(e, p->proto);
}

static __always_inline int ct_lookup(const struct pkt *p, __u8 dir, __u64 now,
				     struct ct_entry **out)
{
	struct ct_key k = {};
	struct ct_entry *e;

	*out = 0;
	if (p->related)
		return CT_RELATED;
	ct_key_fwd(&k, p, dir);
	e = map_ct_lookup(&k);
	if (e && e->expires_ns > now) {
		*out = e;
		return CT_ESTABLISHED;
	}
	ct_key_rev(&k, p, dir);
	e = map_ct_lookup(&k);
	if (e && e->expires_ns > now) {
		*out = e;
		return CT_REPLY;
	}
	return CT_NEW;
}

static __always_inline int ct_create(const struct pkt *p, __u8 dir, __u64 now,
				     __u32 src_identity, __u16 rev_nat_id, __u8 flags)
{
	struct ct_key k = {};
	struct ct_entry e = {};

	ct_key_fwd(&k, p, dir);
	e.created_ns = now;
	e.src_identity = src_identity;
	e.rev_nat_id = rev_nat_id;
	e.packets = 1;
	e.bytes = p->len;
	e.tx_tcp_flags = p->tcp_flags;
	if (p->tcp_flags & TCP_FLAG_FIN)
		flags |= CT_F_TX_CLOSING;
	if (p->tcp_flags & TCP_FLAG_RST)
		flags |= CT_F_TX_CLOSING | CT_F_RX_CLOSING;
	e.flags = flags;
	e.expires_ns = now + ct_lifetime(&e, p->proto);
	if (map_ct_update(&k, &e) < 0)
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

#endif /* CILIARY_LIB_CONNTRACK_H */
