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
