/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Per-CPU counters and flow events (bcc).
 *
 * Invariants:
 *  - Every packet that reaches a verdict is counted exactly once in
 *    ciliary_metrics under {REASON_FORWARDED or drop reason, direction}.
 *  - Events go to the ciliary_events ring buffer; a full ring buffer is
 *    counted under {REASON_EVENT_LOST, 0}, never blocks the packet.
 *  - Every drop emits an event; forwarded (or audited) packets emit one for
 *    a new connection, a SYN/FIN/RST, and for UDP port 53 (with payload), so
 *    events scale with connections, not with packets.
 *  - The policy verdict of a new connection rides on the event of its first
 *    packet (no event of its own): the trace event of an allowed new
 *    connection in an enforced direction has EVENT_F_POLICY_VERDICT set, and
 *    every event carries the deciding entry's rule_ref and POLICY_MATCH_*.
 */
#ifndef CILIARY_LIB_EVENTS_H
#define CILIARY_LIB_EVENTS_H

#include "types.h"
#include "pkt.h"

/* Everything known about a packet when its verdict is reached. */
struct flow_ctx {
	struct pkt p;
	__u32 ep_id;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 rule_ref;
	__be32 orig_daddr;
	__be16 orig_dport;
	__u8 direction;
	__u8 ct_state;
	__u8 policy_match;	/* POLICY_MATCH_* of the deciding policy entry */
	__u8 ev_flags;		/* EVENT_F_* */
};

static __always_inline void metrics_add(__u8 reason, __u8 dir, __u32 len)
{
	struct metrics_key k = {};
	struct metrics_value zero = {};
	struct metrics_value *v;

	k.reason = reason;
	k.direction = dir;
	v = map_metrics_lookup_or_init(&k, &zero);
	if (v) {
		v->packets += 1;
		v->bytes += len;
	}
}

/* UDP to or from port 53, including a request DNATed away from a VIP:53. */
static __always_inline int is_dns(const struct flow_ctx *c)
{
	return c->p.proto == IPPROTO_UDP &&
	       (c->p.sport == bpf_htons(53) || c->p.dport == bpf_htons(53) ||
		c->orig_dport == bpf_htons(53));
}

static __always_inline void emit_event(struct __sk_buff *skb, const struct flow_ctx *c,
				       __u8 type, __u8 verdict, __u8 reason)
{
	struct flow_event *ev;
	__u32 off;
	__u64 n;

	ev = map_events_reserve();
	if (!ev) {
		metrics_add(REASON_EVENT_LOST, 0, 0);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->saddr = c->p.saddr;
	ev->daddr = c->p.daddr;
	ev->sport = c->p.sport;
	ev->dport = c->p.dport;
	ev->src_identity = c->src_identity;
	ev->dst_identity = c->dst_identity;
	ev->ep_id = c->ep_id;
	ev->ifindex = skb->ifindex;
	ev->rule_ref = c->rule_ref;
	ev->orig_daddr = c->orig_daddr;
	ev->orig_dport = c->orig_dport;
	ev->pkt_len = c->p.len > 0xffff ? 0xffff : c->p.len;
	ev->type = type;
	ev->verdict = verdict;
	ev->drop_reason = reason;
	ev->direction = c->direction;
	ev->proto = c->p.proto;
	ev->tcp_flags = c->p.tcp_flags;
	ev->is_reply = c->ct_state == CT_REPLY;
	ev->ct_state = c->ct_state;
	ev->icmp_type = c->p.icmp_type;
	ev->icmp_code = c->p.icmp_code;
	ev->policy_match = c->policy_match;
	ev->flags = c->ev_flags;
	if (is_dns(c)) {
		off = c->p.l4_off + 8;
		if (skb->len > off) {
			n = (__u64)skb->len - off;
			/* Opaque to the compiler, so the clamp below is applied to
			 * the very register passed to the helper. */
			asm volatile("" : "+r"(n));
			if (n > EVENT_PAYLOAD_LEN)
				n = EVENT_PAYLOAD_LEN;
			if (n > 0 && bpf_skb_load_bytes(skb, off, ev->payload, n) == 0)
				ev->payload_len = n;
		}
	}
	map_events_submit(ev);
}

static __always_inline int drop_packet(struct __sk_buff *skb, const struct flow_ctx *c,
				       int reason)
{
	metrics_add(reason, c->direction, c->p.len);
	emit_event(skb, c, EVENT_DROP, VERDICT_DROPPED, reason);
	return TC_ACT_SHOT;
}

static __always_inline int forward_packet(struct __sk_buff *skb, const struct flow_ctx *c,
					  __u8 verdict, __u8 reason)
{
	metrics_add(REASON_FORWARDED, c->direction, c->p.len);
	if (c->ct_state == CT_NEW ||
	    (c->p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)) ||
	    is_dns(c))
		emit_event(skb, c, EVENT_TRACE, verdict, reason);
	return TC_ACT_OK;
}

#endif /* CILIARY_LIB_EVENTS_H */
