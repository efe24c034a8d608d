/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map definitions (bcc only). Every map except the ring buffer is pinned at
 * CILIARY_PIN_DIR/<name>; bcc opens an existing pin instead of creating a new
 * map, so state survives reloads and the agent process.
 * Table methods (map.lookup() ...) are rewritten by bcc only in the main
 * source file: logic headers reach maps through map_* accessors that
 * bpf_lxc.c defines before including them.
 * The ring buffer belongs to one load: events of programs that are replaced
 * on reattach are not carried over.
 */
#ifndef CILIARY_LIB_MAPS_H
#define CILIARY_LIB_MAPS_H

#include "config.h"
#include "types.h"

#define PIN(name) CILIARY_PIN_DIR "/" #name

BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_value,
		 ciliary_ipcache, IPCACHE_MAP_SIZE, PIN(ciliary_ipcache),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct endpoint_key, struct endpoint_info,
		 ciliary_lxc, LXC_MAP_SIZE, PIN(ciliary_lxc));
BPF_TABLE_PINNED("hash", struct policy_key, struct policy_value,
		 ciliary_policy, POLICY_MAP_SIZE, PIN(ciliary_policy));
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry,
		 ciliary_ct4_global, CT_MAP_SIZE, PIN(ciliary_ct4_global));
BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_service,
		 ciliary_lb4_services, LB_MAP_SIZE, PIN(ciliary_lb4_services));
BPF_TABLE_PINNED("hash", __u32, struct lb4_backend,
		 ciliary_lb4_backends, LB_MAP_SIZE, PIN(ciliary_lb4_backends));
BPF_TABLE_PINNED("hash", struct lb4_reverse_nat_key, struct lb4_reverse_nat,
		 ciliary_lb4_reverse_nat, LB_MAP_SIZE, PIN(ciliary_lb4_reverse_nat));
BPF_TABLE_PINNED("hash", struct lb4_maglev_key, struct lb4_maglev_value,
		 ciliary_lb4_maglev, MAGLEV_MAP_SIZE, PIN(ciliary_lb4_maglev),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct lb_affinity_match_key, struct lb_affinity_match_value,
		 ciliary_lb_affinity_match, LB_MAP_SIZE, PIN(ciliary_lb_affinity_match),
		 BPF_F_NO_PREALLOC);
/* Written by the datapath only (like conntrack): */
BPF_TABLE_PINNED("lru_hash", struct lb4_affinity_key, struct lb_affinity_val,
		 ciliary_lb4_affinity, AFFINITY_MAP_SIZE, PIN(ciliary_lb4_affinity));
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct nat4_entry,
		 ciliary_nat4, NAT_MAP_SIZE, PIN(ciliary_nat4));
BPF_TABLE_PINNED("percpu_hash", struct metrics_key, struct metrics_value,
		 ciliary_metrics, METRICS_MAP_SIZE, PIN(ciliary_metrics));

BPF_RINGBUF_OUTPUT(ciliary_events, EVENTS_PAGES);

#endif /* CILIARY_LIB_MAPS_H */
