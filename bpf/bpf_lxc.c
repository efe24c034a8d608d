// SPDX-License-Identifier: Apache-2.0
/*
 * Endpoint datapath: tc programs on the host side of every pod veth.
 *
 *   from_container  tc ingress of the host veth: packets leaving the pod.
 *                   Service DNAT, conntrack, egress policy, events.
 *   to_container    tc egress of the host veth: packets entering the pod.
 *                   Conntrack, reverse NAT, ingress policy, events.
 *   from_netdev     tc ingress of the node's underlay interface: NodePort /
 *                   externalIPs DNAT (+ SNAT for remote backends), replies
 *                   of SNATed flows (lib/nodeport.h).
 *   to_netdev       tc egress of the underlay interface: reverse DNAT of
 *                   replies from local backends.
 *
 * Invariants:
 *  - One compiled object serves every endpoint of a node; the endpoint is
 *    found by skb->ifindex in ciliary_lxc. An interface without an endpoint
 *    entry is not managed and passes untouched.
 *  - Packets from the pod must carry the endpoint's address (else 132).
 *  - Replies of tracked connections pass without policy; every other packet
 *    is checked against policy when the endpoint enforces that direction.
 *  - An allowed connection's policy verdict is reported once per enforced
 *    direction: on the event of its first packet (CT_NEW), never for packets
 *    of an established connection.
 *  - Only IPv4 and ARP are accepted from or to a managed endpoint.
 *  - All state lives in pinned maps (lib/maps.h): replacing the programs
 *    keeps conntrack, so established flows survive a reload.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/icmp.h>

#include "lib/config.h"
#include "lib/types.h"
#include "lib/drop.h"
#include "lib/maps.h"

/* Map accessors used by the lib/ logic headers. bcc rewrites table methods
 * (map.lookup(), map.ringbuf_reserve(), ...) only in the main source file,
 * so every map access of the datapath is spelled here. */
static __always_inline struct ct_entry *map_ct_lookup(struct ct_key *k)
{
	return ciliary_ct4_global.lookup(k);
}

static __always_inline int map_ct_update(struct ct_key *k, struct ct_entry *v)
{
	return ciliary_ct4_global.update(k, v);
}

static __always_inline struct policy_value *map_policy_lookup(struct policy_key *k)
{
	return ciliary_policy.lookup(k);
}

static __always_inline struct lb4_service *map_lb4_service_lookup(struct lb4_key *k)
{
	return ciliary_lb4_services.lookup(k);
}

static __always_inline struct lb4_backend *map_lb4_backend_lookup(__u32 *id)
{
	return ciliary_lb4_backends.lookup(id);
}

static __always_inline struct lb4_reverse_nat *
map_lb4_rev_nat_lookup(struct lb4_reverse_nat_key *k)
{
	return ciliary_lb4_reverse_nat.lookup(k);
}

static __always_inline struct lb4_maglev_value *map_maglev_lookup(struct lb4_maglev_key *k)
{
	return ciliary_lb4_maglev.lookup(k);
}

static __always_inline struct lb_affinity_val *map_affinity_lookup(struct lb4_affinity_key *k)
{
	return ciliary_lb4_affinity.lookup(k);
}

static __always_inline int map_affinity_update(struct lb4_affinity_key *k,
					       struct lb_affinity_val *v)
{
	return ciliary_lb4_affinity.update(k, v);
}

static __always_inline struct lb_affinity_match_value *
map_affinity_match_lookup(struct lb_affinity_match_key *k)
{
	return ciliary_lb_affinity_match.lookup(k);
}

static __always_inline struct nat4_entry *map_nat_lookup(struct ct_key *k)
{
	return ciliary_nat4.lookup(k);
}

static __always_inline int map_nat_update(struct ct_key *k, struct nat4_entry *v)
{
	return ciliary_nat4.update(k, v);
}

static __always_inline struct metrics_value *
map_metrics_lookup_or_init(struct metrics_key *k, struct metrics_value *zero)
{
	return ciliary_metrics.lookup_or_try_init(k, zero);
}

static __always_inline struct flow_event *map_events_reserve(void)
{
	return ciliary_events.ringbuf_reserve(sizeof(struct flow_event));
}

static __always_inline void map_events_submit(struct flow_event *ev)
{
	ciliary_events.ringbuf_submit(ev, 0);
}

#include "lib/pkt.h"
#include "lib/events.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/lb.h"
#include "lib/nodeport.h"

static __always_inline __u32 lookup_identity(__be32 ip)
{
	struct ipcache_key k = {};
	struct ipcache_value *v;

	k.prefixlen = 32;
	k.ip = ip;
	v = ciliary_ipcache.lookup(&k);
	return v ? v->identity : IDENTITY_WORLD;
}

/* Policy for a non-reply packet. Returns 0 to continue (verdict/reason set
 * for audit) or a positive drop reason. Records the deciding entry in c; an
 * allowed first packet of a new connection is marked for a policy verdict. */
static __always_inline int enforce_policy(struct flow_ctx *c, const struct endpoint_info *ep,
					  __u32 peer, __u8 *verdict, __u8 *reason,
					  __u8 *ct_flags)
{
	struct policy_result pr = {};
	__u32 enforce = c->direction == DIR_INGRESS ? EP_F_POLICY_INGRESS : EP_F_POLICY_EGRESS;
	__u32 audit = c->direction == DIR_INGRESS ? EP_F_AUDIT_INGRESS : EP_F_AUDIT_EGRESS;
	int ret;

	if (!(ep->flags & enforce))
		return 0;
	ret = policy_check(ep->identity, peer, policy_dport(&c->p), c->p.proto, c->direction, &pr);
	c->rule_ref = pr.rule_ref;
	c->policy_match = pr.match;
	if (ret == 0) {
		if (c->ct_state == CT_NEW)
			c->ev_flags |= EVENT_F_POLICY_VERDICT;
		return 0;
	}
	if ((ep->flags & audit) || (pr.flags & POLICY_F_AUDIT)) {
		*verdict = VERDICT_AUDIT;
		*reason = -ret;
		*ct_flags |= CT_F_AUDITED;
		return 0;
	}
	return -ret;
}

int from_container(struct __sk_buff *skb)
{
	struct endpoint_key ek = {};
	struct endpoint_info *ep;
	struct flow_ctx c = {};
	struct lb_result lb = {};
	struct ct_entry *ce;
	__u8 verdict = VERDICT_FORWARDED, reason = 0, ct_flags = 0;
	__u16 rev_nat_id = 0;
	__u64 now;
	int ret;

	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK;
	ek.ifindex = skb->ifindex;
	ep = ciliary_lxc.lookup(&ek);
	if (!ep)
		return TC_ACT_OK;
	c.direction = DIR_EGRESS;
	c.ep_id = ep->ep_id;
	c.src_identity = ep->identity;
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return drop_packet(skb, &c, DROP_UNKNOWN_L3);
	ret = pkt_parse(skb, &c.p);
	if (ret < 0)
		return drop_packet(skb, &c, -ret);
	if (c.p.saddr != ep->ipv4)
		return drop_packet(skb, &c, DROP_INVALID_SIP);

	now = bpf_ktime_get_ns();
	ret = lb4_local(skb, &c.p, now, &lb);
	if (ret != 0) {
		c.orig_daddr = lb.vip;
		c.orig_dport = lb.vport;
	}
	if (ret < 0)
		return drop_packet(skb, &c, -ret);
	if (ret > 0) {
		ct_flags |= CT_F_SERVICE;
		rev_nat_id = lb.rev_nat_id;
	}
	c.dst_identity = lookup_identity(c.p.daddr);

	c.ct_state = ct_lookup(&c.p, DIR_EGRESS, now, &ce);
	if (c.ct_state == CT_REPLY || c.ct_state == CT_RELATED) {
		if (ce)
			ct_touch(ce, &c.p, 1, now);
		return forward_packet(skb, &c, VERDICT_FORWARDED, 0);
	}
	ret = enforce_policy(&c, ep, c.dst_identity, &verdict, &reason, &ct_flags);
	if (ret > 0)
		return drop_packet(skb, &c, ret);
	if (ce) {
		ct_touch(ce, &c.p, 0, now);
		/* The post-DNAT tuple may belong to an earlier connection (direct or via
		 * another frontend): the packet decides whether replies are reverse-NATed. */
		if (rev_nat_id) {
			ce->rev_nat_id = rev_nat_id;
			ce->flags |= CT_F_SERVICE;
		} else if ((c.p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
			ce->rev_nat_id = 0;
			ce->flags &= ~CT_F_SERVICE;
		}
	} else {
		ret = ct_create(&c.p, DIR_EGRESS, now, c.src_identity, rev_nat_id, ct_flags);
		if (ret < 0)
			return drop_packet(skb, &c, -ret);
	}
	return forward_packet(skb, &c, verdict, reason);
}

int to_container(struct __sk_buff *skb)
{
	struct endpoint_key ek = {};
	struct endpoint_info *ep;
	struct flow_ctx c = {};
	struct lb_result lb = {};
	struct ct_entry *ce;
	__u8 verdict = VERDICT_FORWARDED, reason = 0, ct_flags = 0;
	__u64 now;
	int ret;

	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK;
	ek.ifindex = skb->ifindex;
	ep = ciliary_lxc.lookup(&ek);
	if (!ep)
		return TC_ACT_OK;
	c.direction = DIR_INGRESS;
	c.ep_id = ep->ep_id;
	c.dst_identity = ep->identity;
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return drop_packet(skb, &c, DROP_UNKNOWN_L3);
	ret = pkt_parse(skb, &c.p);
	if (ret < 0)
		return drop_packet(skb, &c, -ret);
	c.src_identity = lookup_identity(c.p.saddr);

	now = bpf_ktime_get_ns();
	c.ct_state = ct_lookup(&c.p, DIR_INGRESS, now, &ce);
	if (c.ct_state == CT_REPLY) {
		if (ce) {
			ct_touch(ce, &c.p, 1, now);
			if (ce->flags & CT_F_SERVICE) {
				ret = lb4_rev_nat(skb, &c.p, ce->rev_nat_id, &lb);
				if (ret < 0)
					return drop_packet(skb, &c, -ret);
				c.orig_daddr = lb.vip;
				c.orig_dport = lb.vport;
			}
		}
		return forward_packet(skb, &c, VERDICT_FORWARDED, 0);
	}
	if (c.ct_state == CT_RELATED)
		return forward_packet(skb, &c, VERDICT_FORWARDED, 0);

	ret = enforce_policy(&c, ep, c.src_identity, &verdict, &reason, &ct_flags);
	if (ret > 0)
		return drop_packet(skb, &c, ret);
	if (ce) {
		ct_touch(ce, &c.p, 0, now);
	} else {
		ret = ct_create(&c.p, DIR_INGRESS, now, c.src_identity, 0, ct_flags);
		if (ret < 0)
			return drop_packet(skb, &c, -ret);
	}
	return forward_packet(skb, &c, verdict, reason);
}

/* ---- host programs (underlay interface) ------------------------------------ */

int from_netdev(struct __sk_buff *skb)
{
	struct flow_ctx c = {};
	struct lb_result lb = {};
	struct lb4_backend *be = 0;
	struct ct_entry *ce;
	struct ct_key k = {};
	__be32 baddr, snat_addr = 0;
	__be16 bport, snat_port = 0;
	__u64 now;
	int ret, snat;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (pkt_parse(skb, &c.p) < 0)
		return TC_ACT_OK;
	if (c.p.proto != IPPROTO_TCP && c.p.proto != IPPROTO_UDP)
		return TC_ACT_OK;
	c.direction = DIR_SERVICE;
	now = bpf_ktime_get_ns();

	/* A reply of a SNATed NodePort flow (backend on another node). */
	ret = nodeport_rev_snat(skb, &c.p, now, &lb);
	if (ret != 0) {
		c.orig_daddr = lb.vip;
		c.orig_dport = lb.vport;
		c.ct_state = CT_REPLY;
		if (ret < 0)
			return drop_packet(skb, &c, -ret);
		ret = nodeport_redirect(skb, &c.p);
		if (ret < 0)
			return drop_packet(skb, &c, -ret);
		forward_packet(skb, &c, VERDICT_FORWARDED, 0);
		return ret;
	}

	ret = lb4_resolve(&c.p, now, HOST_SVC_KEY, &lb, &be);
	if (ret == 0)
		return TC_ACT_OK;
	c.orig_daddr = lb.vip;
	c.orig_dport = lb.vport;
	c.src_identity = lookup_identity(c.p.saddr);
	if (ret < 0)
		return drop_packet(skb, &c, -ret);
	baddr = be->address;
	bport = be->port;
	c.dst_identity = lookup_identity(baddr);
	c.ct_state = lb.new_flow ? CT_NEW : CT_ESTABLISHED;

	if (lb.new_flow) {
		__be32 unused = 0;
		__u32 oif = nodeport_fib(skb, baddr, c.p.proto, 0, &unused);

		snat = oif && oif == skb->ifindex;
	} else {
		snat = lb.ct_flags & CT_F_SNAT;
	}

	if (snat) {
		/* Backend behind the interface the request came in on: SNAT to the node. */
		ct_key_set(&k, &c.p, HOST_SVC_KEY, 0);
		if (lb.new_flow) {
			ret = lb4_ct_create_service(&c.p, now, HOST_SVC_KEY, &lb, CT_F_SNAT);
			if (ret < 0)
				return drop_packet(skb, &c, -ret);
		}
		ce = map_ct_lookup(&k);
		ret = nodeport_snat_state(skb, &c.p, baddr, bport, lb.rev_nat_id, now,
					  ce ? ce->expires_ns : now + ct_lifetime_default(c.p.proto),
					  &snat_addr, &snat_port);
		if (ret < 0)
			return drop_packet(skb, &c, -ret);
		ret = pkt_rewrite(skb, &c.p, 0, baddr, bport);
		if (ret < 0)
			return drop_packet(skb, &c, -ret);
		ret = pkt_rewrite(skb, &c.p, 1, snat_addr, snat_port);
		if (ret < 0)
			return drop_packet(skb, &c, -ret);
		ret = nodeport_redirect(skb, &c.p);
		if (ret < 0)
			return drop_packet(skb, &c, -ret);
		forward_packet(skb, &c, VERDICT_FORWARDED, 0);
		return ret;
	}

	/* Local backend: keep the client address; to_netdev reverse-NATs the reply. */
	if (lb.new_flow) {
		ret = lb4_ct_create_service(&c.p, now, HOST_SVC_KEY, &lb, 0);
		if (ret < 0)
			return drop_packet(skb, &c, -ret);
	}
	ret = pkt_rewrite(skb, &c.p, 0, baddr, bport);
	if (ret < 0)
		return drop_packet(skb, &c, -ret);
	ct_key_set(&k, &c.p, CT_KEY_F_HOST, 0);
	ce = map_ct_lookup(&k);
	if (ce && ce->expires_ns > now) {
		ct_touch(ce, &c.p, 0, now);
		ce->rev_nat_id = lb.rev_nat_id;
		ce->flags |= CT_F_SERVICE;
	} else {
		ret = ct_create(&c.p, CT_KEY_F_HOST, now, c.src_identity, lb.rev_nat_id, CT_F_SERVICE);
		if (ret < 0)
			return drop_packet(skb, &c, -ret);
	}
	return forward_packet(skb, &c, VERDICT_FORWARDED, 0);
}

int to_netdev(struct __sk_buff *skb)
{
	struct flow_ctx c = {};
	struct lb_result lb = {};
	struct ct_entry *ce;
	struct ct_key k = {};
	__u64 now;
	int ret;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (pkt_parse(skb, &c.p) < 0)
		return TC_ACT_OK;
	if (c.p.proto != IPPROTO_TCP && c.p.proto != IPPROTO_UDP)
		return TC_ACT_OK;
	/* A reply from a local backend of a NodePort flow: {client -> backend}. */
	ct_key_set(&k, &c.p, CT_KEY_F_HOST, 1);
	ce = map_ct_lookup(&k);
	now = bpf_ktime_get_ns();
	if (!ce || ce->expires_ns <= now || !(ce->flags & CT_F_SERVICE))
		return TC_ACT_OK;
	c.direction = DIR_SERVICE;
	c.ct_state = CT_REPLY;
	ct_touch(ce, &c.p, 1, now);
	ret = lb4_rev_nat(skb, &c.p, ce->rev_nat_id, &lb);
	if (ret < 0)
		return drop_packet(skb, &c, -ret);
	c.orig_daddr = lb.vip;
	c.orig_dport = lb.vport;
	return forward_packet(skb, &c, VERDICT_FORWARDED, 0);
}
