/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Bob Jenkins' jhash_3words as in the Linux kernel (include/linux/jhash.h),
 * used for the Maglev index of a flow. Plain C: services/node/maps.py has a
 * Python twin (maglev_hash) so userspace can predict the datapath's choice.
 */
#ifndef CILIARY_LIB_JHASH_H
#define CILIARY_LIB_JHASH_H

#include <linux/types.h>

#define CILIARY_JHASH_INITVAL	0xdeadbeef

static __always_inline __u32 ciliary_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

static __always_inline __u32 jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += CILIARY_JHASH_INITVAL + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	c ^= b; c -= ciliary_rol32(b, 14);
	a ^= c; a -= ciliary_rol32(c, 11);
	b ^= a; b -= ciliary_rol32(a, 25);
	c ^= b; c -= ciliary_rol32(b, 16);
	a ^= c; a -= ciliary_rol32(c, 4);
	b ^= a; b -= ciliary_rol32(a, 14);
	c ^= b; c -= ciliary_rol32(b, 24);
	return c;
}

#endif /* CILIARY_LIB_JHASH_H */
