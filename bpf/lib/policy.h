/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Policy lookup over ciliary_policy (bcc).
 *
 * Invariants:
 *  - Keys are tried from most to least specific: {peer, port, proto},
 *    {peer, *, proto}, {peer, *, *}, then the same with peer identity 0 (any).
 *  - A deny entry at any specificity beats every allow entry.
 *  - No matching entry while policy is enforced is DROP_POLICY (133); a
 *    matching deny is DROP_POLICY_DENY (181), as in Cilium.
 *  - Whether a direction is enforced at all is the endpoint's EP_F_POLICY_*
 *    flag; the caller skips this lookup when it is clear (allow all).
 *  - ICMP is looked up with the ICMP type as the port (policy_dport), Cilium's
 *    encoding of `icmps` rules; the echo id stays in the conntrack ports.
 *  - The result names the deciding entry: its rule_ref, flags and match type
 *    (POLICY_MATCH_* from the key that hit: {peer, port, proto} L3_L4,
 *    {peer, *, proto} L3_PROTO, {peer, *, *} L3_ONLY, {*, port, proto} L4_ONLY,
 *    {*, *, proto} PROTO_ONLY, {*, *, *} ALL; NONE when nothing matched).
 */
#ifndef CILIARY_LIB_POLICY_H
#define CILIARY_LIB_POLICY_H

#include "types.h"
#include "drop.h"
#include "pkt.h"

struct policy_result {
	__u32 rule_ref;
	__u8 flags;		/* POLICY_F_* of the deciding entry */
	__u8 match;		/* POLICY_MATCH_* of the deciding entry */
};

/* Match type of lookup step i (0..5) of policy_check. */
static __always_inline __u8 policy_match_type(int i)
{
	return i == 0 ? POLICY_MATCH_L3_L4 :
	       i == 1 ? POLICY_MATCH_L3_PROTO :
	       i == 2 ? POLICY_MATCH_L3_ONLY :
	       i == 3 ? POLICY_MATCH_L4_ONLY :
	       i == 4 ? POLICY_MATCH_PROTO_ONLY : POLICY_MATCH_ALL;
}

/* The port a packet is looked up with: its destination port, or its ICMP type. */
static __always_inline __be16 policy_dport(const struct pkt *p)
{
	return p->proto == IPPROTO_ICMP ? bpf_htons((__u16)p->icmp_type) : p->dport;
}

/* Returns 0 when allowed, -DROP_POLICY or -DROP_POLICY_DENY otherwise. */
static __always_inline int policy_check(__u32 local_id, __u32 peer_id, __be16 dport,
					__u8 proto, __u8 dir, struct policy_result *res)
{
	struct policy_key k = {};
	struct policy_value *v;
	int allowed = 0;
	int i;

	k.local_id = local_id;
	k.direction = dir;
	res->rule_ref = 0;
	res->flags = 0;
	res->match = POLICY_MATCH_NONE;
#pragma unroll
	for (i = 0; i < 6; i++) {
		k.peer_id = i < 3 ? peer_id : 0;
		k.dport = (i == 0 || i == 3) ? dport : 0;
		k.proto = (i == 2 || i == 5) ? 0 : proto;
		v = map_policy_lookup(&k);
		if (!v)
			continue;
		if (v->verdict == POLICY_DENY) {
			res->rule_ref = v->rule_ref;
			res->flags = v->flags;
			res->match = policy_match_type(i);
			return -DROP_POLICY_DENY;
		}
		if (v->verdict == POLICY_ALLOW && !allowed) {
			allowed = 1;
			res->rule_ref = v->rule_ref;
			res->flags = v->flags;
			res->match = policy_match_type(i);
		}
	}
	return allowed ? 0 : -DROP_POLICY;
}

#endif /* CILIARY_LIB_POLICY_H */
