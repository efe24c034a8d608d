/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket-level load balancing (bpf_sock.c): the maps it adds beside the lb4
 * maps of lib/maps.h, and the pure parts of backend selection.
 *
 * Invariants:
 *  - Plain C over <linux/types.h> only (no bcc table syntax), so gcc can
 *    compile it: services/node/socklb.py has ctypes twins of every struct and
 *    tests/unit/test_socklb.py compares sizes and offsets.
 *  - Explicit padding, no compiler-inserted holes (hash keys compare bytewise).
 *  - Addresses and ports are in network byte order, as in every other map.
 *  - Reverse-sk entries are keyed by the socket cookie, which the kernel never
 *    reuses while it runs; they are only written by connect4/sendmsg4 and
 *    evicted by the LRU (or deleted when their service is gone).
 */
#ifndef CILIARY_LIB_SOCK_H
#define CILIARY_LIB_SOCK_H

#include <linux/types.h>

#ifndef SOCK_REVNAT_MAP_SIZE
#define SOCK_REVNAT_MAP_SIZE	262144
#endif
#ifndef SOCK_AFFINITY_MAP_SIZE
#define SOCK_AFFINITY_MAP_SIZE	65536
#endif
/* 1: translate only sockets of the node's own network namespace. */
#ifndef SOCK_LB_HOSTNS_ONLY
#define SOCK_LB_HOSTNS_ONLY	0
#endif
#ifndef HOST_NETNS_COOKIE
#define HOST_NETNS_COOKIE	0ULL
#endif
#ifndef SOCK_LB_HASH_SEED
#define SOCK_LB_HASH_SEED	0x50c1b5ee
#endif

/* ciliary_lb4_reverse_sk (Cilium's cilium_lb4_reverse_sk):
 * {socket cookie, backend address, backend port} -> {frontend, rev_nat_index}. */
struct sock_revnat_key {
	__u64 cookie;
	__be32 address;		/* backend */
	__be16 port;		/* backend */
	__u16 pad;
};

struct sock_revnat_value {
	__be32 address;		/* frontend (VIP) */
	__be16 port;		/* frontend */
	__u16 rev_nat_index;
};

/* ciliary_lb4_affinity_sock: ClientIP affinity of the socket layer, keyed by
 * the network namespace of the socket (as Cilium's socket LB does: a socket
 * has no source address yet at connect time). Value: struct lb_affinity_val. */
struct sock_affinity_key {
	__u64 netns_cookie;
	__u16 rev_nat_id;
	__u16 pad[3];
};

/* A 64-bit socket cookie folded into 32 bits for slot and Maglev choice. */
static inline __attribute__((always_inline)) __u32 sock_cookie_hash(__u64 cookie)
{
	__u32 h = (__u32)cookie ^ (__u32)(cookie >> 32) ^ SOCK_LB_HASH_SEED;

	/* murmur3 fmix32: spreads consecutive cookies over the whole range */
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* Slot 1..count for a new socket: TCP random, UDP by socket cookie so that
 * every datagram of an unconnected socket reaches the same backend
 * (Cilium's sock_select_slot). */
static inline __attribute__((always_inline)) __u16 sock_slot(__u32 rnd, __u64 cookie, int udp, __u16 count)
{
	__u32 h = udp ? sock_cookie_hash(cookie) : rnd;

	return (__u16)(h % count) + 1;
}

#endif /* CILIARY_LIB_SOCK_H */
