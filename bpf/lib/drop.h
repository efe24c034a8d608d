/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Drop reasons. Values are Cilium's (bpf/lib/common.h DROP_*, negated), so
 * Hubble-style tooling and operators read the same numbers. Plain C: usable
 * from userspace gcc and from bcc.
 */
#ifndef CILIARY_LIB_DROP_H
#define CILIARY_LIB_DROP_H

#define DROP_INVALID_SIP	132	/* source address is not the endpoint's */
#define DROP_POLICY		133	/* policy enforced, no allow entry matched */
#define DROP_INVALID		134	/* malformed packet */
#define DROP_CT_INVALID_HDR	135
#define DROP_UNKNOWN_L3		139
#define DROP_WRITE_ERROR	141
#define DROP_UNKNOWN_L4		142
#define DROP_CSUM_L3		153
#define DROP_CSUM_L4		154
#define DROP_CT_CREATE_FAILED	155
#define DROP_FRAG_NOSUPPORT	157
#define DROP_NO_SERVICE		158	/* service frontend without backends */
#define DROP_NAT_NO_MAPPING	167	/* NodePort SNAT: no free port */
#define DROP_NO_FIB		169	/* NodePort: no route for a translated packet */
#define DROP_POLICY_DENY	181	/* an explicit deny entry matched */

#endif /* CILIARY_LIB_DROP_H */
