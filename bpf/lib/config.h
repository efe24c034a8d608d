/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Datapath configuration. Every value is a -D cflag set by
 * services/node/datapath.py; the defaults below are Cilium's.
 *
 * Invariants:
 *  - CILIARY_PIN_DIR is mandatory: all maps are pinned under it and reused,
 *    never recreated, by every later load with the same sizes.
 *  - One conntrack map (CT_MAP_SIZE entries, default 1M) holds TCP and
 *    non-TCP flows; Cilium splits them 1M/256k.
 *  - Lifetimes are seconds; the datapath stores absolute expiry in
 *    bpf_ktime_get_ns() time (CLOCK_MONOTONIC) so userspace GC can compare.
 */
#ifndef CILIARY_LIB_CONFIG_H
#define CILIARY_LIB_CONFIG_H

#ifndef CILIARY_PIN_DIR
#error "CILIARY_PIN_DIR must be defined (pin directory for maps)"
#endif

#ifndef IPCACHE_MAP_SIZE
#define IPCACHE_MAP_SIZE	512000
#endif
#ifndef LXC_MAP_SIZE
#define LXC_MAP_SIZE		65535
#endif
#ifndef POLICY_MAP_SIZE
#define POLICY_MAP_SIZE		16384
#endif
#ifndef CT_MAP_SIZE
#define CT_MAP_SIZE		1048576
#endif
#ifndef LB_MAP_SIZE
#define LB_MAP_SIZE		65536
#endif
#ifndef MAGLEV_MAP_SIZE
#define MAGLEV_MAP_SIZE		1048576	/* {service, index} entries, no prealloc */
#endif
#ifndef LB_MAGLEV_TABLE_SIZE
#define LB_MAGLEV_TABLE_SIZE	16381	/* M: entries per service table (prime) */
#endif
#ifndef LB_MAGLEV_SEED
#define LB_MAGLEV_SEED		0x5ca1ab1e	/* jhash seed; the same on every node */
#endif
#ifndef AFFINITY_MAP_SIZE
#define AFFINITY_MAP_SIZE	65536
#endif
#ifndef NAT_MAP_SIZE
#define NAT_MAP_SIZE		65536	/* NodePort SNAT: two entries per flow */
#endif
#ifndef NODEPORT_SNAT_MIN
#define NODEPORT_SNAT_MIN	61000	/* above the kernel's default ephemeral range */
#endif
#ifndef NODEPORT_SNAT_MAX
#define NODEPORT_SNAT_MAX	65535
#endif
#ifndef METRICS_MAP_SIZE
#define METRICS_MAP_SIZE	1024
#endif
#ifndef EVENTS_PAGES
#define EVENTS_PAGES		256	/* ring buffer pages (power of two) */
#endif

#ifndef CT_LIFETIME_TCP
#define CT_LIFETIME_TCP		21600	/* established TCP, 6h */
#endif
#ifndef CT_LIFETIME_NONTCP
#define CT_LIFETIME_NONTCP	60
#endif
#ifndef CT_SYN_TIMEOUT
#define CT_SYN_TIMEOUT		60	/* TCP without a reply yet */
#endif
#ifndef CT_CLOSE_TIMEOUT
#define CT_CLOSE_TIMEOUT	10	/* TCP after FIN both ways or RST */
#endif

#define CILIARY_NSEC_PER_SEC		1000000000ULL

#endif /* CILIARY_LIB_CONFIG_H */
