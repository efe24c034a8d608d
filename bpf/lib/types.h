/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map keys, map values and ring-buffer event layouts shared by the BPF
 * datapath (compiled by bcc) and userspace (services/node/layouts.py).
 *
 * Invariants:
 *  - Every struct here has a ctypes twin in services/node/layouts.py with the
 *    same size and field offsets; tests/unit/test_layouts.py compiles this
 *    header with plain gcc and compares them.
 *  - Only fixed-width <linux/types.h> types; explicit padding fields so that no
 *    struct has compiler-inserted holes (hash keys are compared bytewise).
 *  - Addresses and ports are in network byte order (__be32/__be16) everywhere:
 *    in ipcache, endpoints, conntrack, policy, lb maps and events.
 */
#ifndef CILIARY_LIB_TYPES_H
#define CILIARY_LIB_TYPES_H

#include <linux/types.h>

/* Reserved identities (Cilium numbering). */
#define IDENTITY_UNKNOWN	0
#define IDENTITY_HOST		1
#define IDENTITY_WORLD		2

/* Traffic direction, seen from the endpoint (Cilium METRIC_INGRESS/EGRESS). */
#define DIR_INGRESS		1	/* to_container: packet enters the pod */
#define DIR_EGRESS		2	/* from_container: packet leaves the pod */
#define DIR_SERVICE		3	/* host programs (NodePort): Cilium METRIC_SERVICE */

/* ---- ipcache: LPM trie, prefix -> identity ---------------------------- */
struct ipcache_key {
	__u32 prefixlen;	/* bits of ip that are significant, 0..32 */
	__be32 ip;
};

#define IPCACHE_F_LOCAL		(1 << 0)	/* address is a local endpoint */

struct ipcache_value {
	__u32 identity;
	__u32 flags;
};

/* ---- endpoints (ciliary_lxc): host veth ifindex -> endpoint ------------ */
struct endpoint_key {
	__u32 ifindex;		/* host-side veth ifindex in the node netns */
};

#define EP_F_POLICY_INGRESS	(1 << 0)	/* ingress policy enforced */
#define EP_F_POLICY_EGRESS	(1 << 1)	/* egress policy enforced */
#define EP_F_AUDIT_INGRESS	(1 << 2)	/* ingress denies are only audited */
#define EP_F_AUDIT_EGRESS	(1 << 3)	/* egress denies are only audited */

struct endpoint_info {
	__u32 ep_id;
	__u32 identity;
	__be32 ipv4;		/* the pod address; other sources are dropped */
	__u32 flags;		/* EP_F_* */
};

/* ---- policy: {local identity, peer identity, port, proto, dir} -------- */
/* Zero in peer_id, dport or proto is a wildcard. */
struct policy_key {
	__u32 local_id;
	__u32 peer_id;
	__be16 dport;
	__u8 proto;
	__u8 direction;		/* DIR_INGRESS / DIR_EGRESS */
};

#define POLICY_ALLOW		1
#define POLICY_DENY		2
#define POLICY_F_AUDIT		(1 << 0)

struct policy_value {
	__u8 verdict;		/* POLICY_ALLOW / POLICY_DENY */
	__u8 flags;		/* POLICY_F_* */
	__u16 pad;
	__u32 rule_ref;		/* opaque reference to the rule, echoed in events */
};

/* ---- conntrack ---------------------------------------------------------- */
/* Tuple in the direction of the packet that created the entry. flags carries
 * the direction of the hook that created it (DIR_*), and CT_KEY_F_SERVICE for
 * the entry keyed by the pre-DNAT (VIP) tuple that pins the chosen backend.
 */
#define CT_KEY_F_SERVICE	(1 << 4)
#define CT_KEY_F_HOST		(1 << 5)	/* created by the host programs (NodePort) */

struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 flags;
	__u16 pad;
};

/* Result of a conntrack lookup (Cilium CT_*). */
#define CT_NEW			0
#define CT_ESTABLISHED		1
#define CT_REPLY		2
#define CT_RELATED		3

#define CT_F_SEEN_REPLY		(1 << 0)
#define CT_F_TX_CLOSING		(1 << 1)	/* FIN/RST seen in original dir */
#define CT_F_RX_CLOSING		(1 << 2)	/* FIN/RST seen in reply dir */
#define CT_F_SERVICE		(1 << 3)	/* DNATed flow; rev_nat_id valid */
#define CT_F_AUDITED		(1 << 4)	/* admitted by an audit verdict */
#define CT_F_SNAT		(1 << 5)	/* NodePort flow SNATed to the node (ciliary_nat4) */

struct ct_entry {
	__u64 created_ns;	/* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u64 expires_ns;	/* entry is dead after this; GC deletes it */
	__u64 packets;
	__u64 bytes;
	__u32 backend_id;	/* service entries: chosen backend */
	__u32 src_identity;
	__u16 rev_nat_id;	/* CT_F_SERVICE: key into ciliary_lb4_reverse_nat */
	__u8 flags;		/* CT_F_* */
	__u8 tx_tcp_flags;	/* union of TCP flags seen, original direction */
	__u8 rx_tcp_flags;	/* union of TCP flags seen, reply direction */
	__u8 pad[3];
};

/* Rewriting state of one NodePort flow that is SNATed to the node because its
 * backend is behind the interface the request arrived on. Two entries per
 * flow in ciliary_nat4, keyed by struct ct_key with flags NAT_KEY_*:
 *   NAT_KEY_FWD {client -> frontend}        -> {snat addr, snat port}
 *   NAT_KEY_REV {backend -> snat addr:port} -> {client addr, client port}
 */
#define NAT_KEY_FWD		1
#define NAT_KEY_REV		2

struct nat4_entry {
	__u64 expires_ns;	/* bpf_ktime_get_ns; dead after this */
	__be32 addr;
	__be16 port;
	__u16 rev_nat_id;	/* the frontend, for the reply's source */
};

/* ---- load balancing (Cilium lb4 layouts) -------------------------------- */
struct lb4_key {
	__be32 address;		/* service VIP */
	__be16 dport;		/* service port */
	__u16 backend_slot;	/* 0: the service itself, 1..count: backends */
	__u8 proto;
	__u8 scope;
	__u8 pad[2];
};

/* Slot 0 flags (Cilium SVC_FLAG_*, lb4_service.flags). */
#define SVC_FLAG_EXTERNAL_IP	(1 << 0)	/* externalIPs frontend */
#define SVC_FLAG_NODEPORT	(1 << 1)	/* NodePort frontend (a node's address) */
#define SVC_FLAG_EXT_LOCAL_SCOPE (1 << 2)	/* externalTrafficPolicy=Local */
#define SVC_FLAG_AFFINITY	(1 << 4)	/* sessionAffinity=ClientIP */
#define SVC_FLAG_LOADBALANCER	(1 << 5)	/* LoadBalancer ingress address */
/* lb4_service.flags2 */
#define SVC_FLAG2_INT_LOCAL_SCOPE (1 << 4)	/* internalTrafficPolicy=Local */
#define SVC_FLAG2_MAGLEV	(1 << 7)	/* algorithm maglev: ciliary_lb4_maglev */

struct lb4_service {
	__u32 backend_id;	/* slot > 0: backend id; slot 0: affinity timeout (s) */
	__u16 count;		/* slot 0: number of backend slots */
	__u16 rev_nat_index;
	__u8 flags;
	__u8 flags2;
	__u8 pad[2];
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;
};

struct lb4_reverse_nat_key {
	__u16 rev_nat_id;
};

struct lb4_reverse_nat {
	__be32 address;
	__be16 port;
	__u16 pad;
};

/* Maglev lookup table of one service: {rev_nat_id, index 0..M-1} -> backend. */
struct lb4_maglev_key {
	__u16 rev_nat_id;
	__u16 pad;
	__u32 index;
};

struct lb4_maglev_value {
	__u32 backend_id;
};

/* ClientIP session affinity (written by the datapath). */
struct lb4_affinity_key {
	__be32 client_ip;
	__u16 rev_nat_id;
	__u16 pad;
};

struct lb_affinity_val {
	__u64 last_used;	/* bpf_ktime_get_ns of the last new connection */
	__u32 backend_id;
	__u32 pad;
};

/* {backend, service} pairs an affinity entry may still name (the agent writes
 * one per slot backend of an affinity service, as Cilium's affinity match). */
struct lb_affinity_match_key {
	__u32 backend_id;
	__u16 rev_nat_id;
	__u16 pad;
};

struct lb_affinity_match_value {
	__u32 flags;		/* unused, 0 */
};

/* ---- metrics: per-CPU counters keyed {reason, direction} --------------- */
/* reason 0 = forwarded, otherwise the (positive) drop reason. */
#define REASON_FORWARDED	0
#define REASON_EVENT_LOST	254	/* ring buffer full; dir 0 */

struct metrics_key {
	__u8 reason;
	__u8 direction;
	__u16 pad;
};

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* ---- flow events (ring buffer ciliary_events) -------------------------- */
#define EVENT_TRACE		1	/* forwarded packet worth reporting */
#define EVENT_DROP		2

/* Hubble verdict numbering. */
#define VERDICT_FORWARDED	1
#define VERDICT_DROPPED		2
#define VERDICT_AUDIT		4

/* flow_event.flags */
#define EVENT_F_POLICY_VERDICT	(1 << 0)	/* first packet of a new connection in an
						 * enforced direction, allowed by policy:
						 * also report a policy verdict */

/* Which policy entry decided (Cilium POLICY_MATCH_*, Hubble policy_match_type),
 * by the wildcards of the entry that matched (lib/policy.h lookup order). */
#define POLICY_MATCH_NONE	0	/* no entry (default deny) */
#define POLICY_MATCH_L3_ONLY	1	/* {peer, *, *} */
#define POLICY_MATCH_L3_L4	2	/* {peer, port, proto} */
#define POLICY_MATCH_L4_ONLY	3	/* {*, port, proto} */
#define POLICY_MATCH_ALL	4	/* {*, *, *} */
#define POLICY_MATCH_L3_PROTO	5	/* {peer, *, proto} */
#define POLICY_MATCH_PROTO_ONLY	6	/* {*, *, proto} */

#ifndef EVENT_PAYLOAD_LEN
#define EVENT_PAYLOAD_LEN	128
#endif

struct flow_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ep_id;
	__u32 ifindex;
	__u32 rule_ref;
	__be32 orig_daddr;	/* service VIP when DNATed / reverse-NATed, else 0 */
	__be16 orig_dport;
	__u16 pkt_len;
	__u8 type;		/* EVENT_* */
	__u8 verdict;		/* VERDICT_* */
	__u8 drop_reason;	/* 0 or Cilium drop reason */
	__u8 direction;		/* DIR_* */
	__u8 proto;
	__u8 tcp_flags;
	__u8 is_reply;
	__u8 ct_state;		/* CT_* */
	__u16 payload_len;	/* bytes valid in payload (UDP/53 only) */
	__u8 icmp_type;		/* ICMP type and code, 0 for other protocols */
	__u8 icmp_code;
	__u8 policy_match;	/* POLICY_MATCH_* of the entry that decided (rule_ref's) */
	__u8 flags;		/* EVENT_F_* */
	__u8 pad[2];
	__u8 payload[EVENT_PAYLOAD_LEN];
};

#endif /* CILIARY_LIB_TYPES_H */
