// SPDX-License-Identifier: Apache-2.0
/*
 * Socket-level load balancing: cgroup v2 sock_addr programs attached to the
 * node's cgroup (services/node/socklb.py), beside the per-packet DNAT of
 * bpf_lxc.c and reading the same pinned lb4 maps.
 *
 *   sock4_connect      cgroup/connect4: a TCP or UDP socket connecting to a
 *                      frontend connects to a backend instead.
 *   sock4_sendmsg      cgroup/sendmsg4: the same, per datagram of an
 *                      unconnected UDP socket.
 *   sock4_recvmsg      cgroup/recvmsg4: a datagram from a backend the socket
 *                      was translated to reads as coming from the frontend.
 *   sock4_getpeername  cgroup/getpeername4: the peer of a translated socket
 *                      is the frontend.
 *
 * Invariants:
 *  - Only IPv4 TCP and UDP, only ClusterIP and NodePort frontends (flags
 *    SVC_FLAG_EXTERNAL_IP / SVC_FLAG_LOADBALANCER are skipped), only services
 *    with at least one backend: everything else is left untouched, so the
 *    packet path (bpf_lxc.c) still handles it (and drops a backend-less
 *    service with 158 where a pod sends to it).
 *  - SOCK_LB_HOSTNS_ONLY: sockets whose network namespace is not the node's
 *    own (HOST_NETNS_COOKIE) are never translated.
 *  - Backend of a new socket, in order: ClientIP affinity keyed by the
 *    socket's netns cookie; Maglev entry {rev_nat_id, hash(socket cookie) % M};
 *    a slot chosen at random (TCP) or by socket cookie (UDP).
 *  - Every translation records {cookie, backend} -> frontend in
 *    ciliary_lb4_reverse_sk; recvmsg4/getpeername4 restore the frontend only
 *    while its service still exists, and delete stale entries.
 *  - The programs never reject: connect4/sendmsg4 return 1 even when they
 *    translate nothing.
 *  - No map of lib/maps.h is changed: the lb4 maps are declared here with
 *    their exact definitions so bcc opens the existing pins.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#include "lib/config.h"
#include "lib/types.h"
#include "lib/sock.h"

#define SOCK_PIN(name) CILIARY_PIN_DIR "/" #name
#define SYS_PROCEED 1
#define SOCK_SKIP_FLAGS (SVC_FLAG_EXTERNAL_IP | SVC_FLAG_LOADBALANCER)

/* The lb4 maps of lib/maps.h (same type, layout, size and flags). */
BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_service,
		 ciliary_lb4_services, LB_MAP_SIZE, SOCK_PIN(ciliary_lb4_services));
BPF_TABLE_PINNED("hash", __u32, struct lb4_backend,
		 ciliary_lb4_backends, LB_MAP_SIZE, SOCK_PIN(ciliary_lb4_backends));
BPF_TABLE_PINNED("hash", struct lb4_maglev_key, struct lb4_maglev_value,
		 ciliary_lb4_maglev, MAGLEV_MAP_SIZE, SOCK_PIN(ciliary_lb4_maglev),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct lb_affinity_match_key, struct lb_affinity_match_value,
		 ciliary_lb_affinity_match, LB_MAP_SIZE, SOCK_PIN(ciliary_lb_affinity_match),
		 BPF_F_NO_PREALLOC);
/* The socket layer's own maps (lib/sock.h). */
BPF_TABLE_PINNED("lru_hash", struct sock_revnat_key, struct sock_revnat_value,
		 ciliary_lb4_reverse_sk, SOCK_REVNAT_MAP_SIZE, SOCK_PIN(ciliary_lb4_reverse_sk));
BPF_TABLE_PINNED("lru_hash", struct sock_affinity_key, struct lb_affinity_val,
		 ciliary_lb4_affinity_sock, SOCK_AFFINITY_MAP_SIZE,
		 SOCK_PIN(ciliary_lb4_affinity_sock));

static __always_inline int sock4_in_scope(struct bpf_sock_addr *ctx)
{
#if SOCK_LB_HOSTNS_ONLY
	return bpf_get_netns_cookie(ctx) == (__u64)HOST_NETNS_COOKIE;
#else
	return 1;
#endif
}

/* The backend of a new socket to the service of slot 0 *svc (see the header). */
static __always_inline struct lb4_backend *sock4_pick(struct bpf_sock_addr *ctx,
						      struct lb4_key *key,
						      struct lb4_service *svc,
						      __u64 cookie, __u32 *out_id)
{
	struct sock_affinity_key ak = {};
	struct lb_affinity_val nv = {};
	struct lb4_service *slot;
	struct lb4_backend *be = 0;
	__u32 backend_id = 0;
	__u16 rev = svc->rev_nat_index;
	__u32 timeout = svc->backend_id;
	__u16 count = svc->count;
	int affinity = (svc->flags & SVC_FLAG_AFFINITY) && timeout;
	int maglev = svc->flags2 & SVC_FLAG2_MAGLEV;
	__u64 now = bpf_ktime_get_ns();

	if (affinity) {
		struct lb_affinity_val *av;

		ak.netns_cookie = bpf_get_netns_cookie(ctx);
		ak.rev_nat_id = rev;
		av = ciliary_lb4_affinity_sock.lookup(&ak);
		if (av && av->last_used + (__u64)timeout * CILIARY_NSEC_PER_SEC > now) {
			struct lb_affinity_match_key mk = {};

			mk.backend_id = av->backend_id;
			mk.rev_nat_id = rev;
			if (ciliary_lb_affinity_match.lookup(&mk)) {
				backend_id = mk.backend_id;
				be = ciliary_lb4_backends.lookup(&backend_id);
			}
		}
	}
	if (!be && maglev) {
		struct lb4_maglev_key gk = {};
		struct lb4_maglev_value *gv;

		gk.rev_nat_id = rev;
		gk.index = sock_cookie_hash(cookie) % LB_MAGLEV_TABLE_SIZE;
		gv = ciliary_lb4_maglev.lookup(&gk);
		if (gv) {
			backend_id = gv->backend_id;
			be = ciliary_lb4_backends.lookup(&backend_id);
		}
	}
	if (!be) {
		key->backend_slot = sock_slot(bpf_get_prandom_u32(), cookie,
					      key->proto == IPPROTO_UDP, count);
		slot = ciliary_lb4_services.lookup(key);
		if (!slot)
			return 0;
		backend_id = slot->backend_id;
		be = ciliary_lb4_backends.lookup(&backend_id);
		if (!be)
			return 0;
	}
	if (affinity) {
		nv.last_used = now;
		nv.backend_id = backend_id;
		ciliary_lb4_affinity_sock.update(&ak, &nv);
	}
	*out_id = backend_id;
	return be;
}

/* Rewrite the destination of ctx to a backend when it is a frontend. */
static __always_inline void sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct lb4_key key = {};
	struct lb4_service *svc;
	struct lb4_backend *be;
	struct sock_revnat_key rk = {};
	struct sock_revnat_value rv = {};
	__u32 proto = ctx->protocol;
	__u32 backend_id = 0;
	__u64 cookie;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return;
	if (!sock4_in_scope(ctx))
		return;
	key.address = ctx->user_ip4;
	key.dport = (__be16)ctx->user_port;
	key.proto = proto;
	svc = ciliary_lb4_services.lookup(&key);
	if (!svc || svc->count == 0 || (svc->flags & SOCK_SKIP_FLAGS))
		return;
	cookie = bpf_get_socket_cookie(ctx);
	be = sock4_pick(ctx, &key, svc, cookie, &backend_id);
	if (!be)
		return;
	rk.cookie = cookie;
	rk.address = be->address;
	rk.port = be->port;
	rv.address = key.address;
	rv.port = key.dport;
	rv.rev_nat_index = svc->rev_nat_index;
	/* Without the reverse entry a reply would not match the socket's VIP:
	 * leave the socket to the packet path rather than half-translating it. */
	if (ciliary_lb4_reverse_sk.update(&rk, &rv) < 0)
		return;
	ctx->user_ip4 = rk.address;
	ctx->user_port = rk.port;
}

/* Restore the frontend as the peer of a translated socket. */
static __always_inline void sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct sock_revnat_key rk = {};
	struct sock_revnat_value *rv;
	struct lb4_key key = {};
	struct lb4_service *svc;

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.address = ctx->user_ip4;
	rk.port = (__be16)ctx->user_port;
	rv = ciliary_lb4_reverse_sk.lookup(&rk);
	if (!rv)
		return;
	key.address = rv->address;
	key.dport = rv->port;
	key.proto = ctx->protocol;
	svc = ciliary_lb4_services.lookup(&key);
	if (!svc || svc->rev_nat_index != rv->rev_nat_index) {
		ciliary_lb4_reverse_sk.delete(&rk);
		return;
	}
	ctx->user_ip4 = rv->address;
	ctx->user_port = rv->port;
}

int sock4_connect(struct bpf_sock_addr *ctx)
{
	sock4_xlate_fwd(ctx);
	return SYS_PROCEED;
}

int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	sock4_xlate_fwd(ctx);
	return SYS_PROCEED;
}

int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}
