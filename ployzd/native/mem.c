/*
 * memcpy, memmove, memset, memcmp and bcmp for the static musl build of ployzd.
 *
 * musl's x86_64 memcpy is `rep movsq` whatever the size, memmove and memset are
 * close to it, and memcmp/bcmp compare a byte at a time. Rust calls these for
 * almost every move of a value and comparison of a slice (sled's key search,
 * serde's buffers, the NATS and WireGuard paths), mostly with a few dozen bytes:
 * on this project's VMs a 32-byte musl memcpy costs ~40 ns against ~3 ns for
 * glibc's, and the four functions took 15-17 % of the CPU of a 3-machine
 * cluster under KV load (BENCHMARKS.md, issue 15). These are the usual
 * small-size strategies (overlapping head/tail loads, 16-byte SSE2 chunks, the
 * string instructions only for large sizes), in portable C with SSE2, which
 * every x86_64 has.
 *
 * Linked ahead of libc.a (build.rs), so the linker takes these and never pulls
 * musl's. Each is also exported as ployz_* for the tests (tests/mem.rs), which
 * check every size and alignment up to a few hundred bytes, both overlap
 * directions, against byte-by-byte references.
 *
 * Compiled with -fno-builtin and -fno-tree-loop-distribute-patterns: the
 * compiler must never turn a loop here into a call to the function itself.
 */
#include <stddef.h>
#include <stdint.h>
#include <emmintrin.h>

typedef uint64_t u64u __attribute__((may_alias, aligned(1)));
typedef uint32_t u32u __attribute__((may_alias, aligned(1)));
typedef uint16_t u16u __attribute__((may_alias, aligned(1)));

#define LD16(p) _mm_loadu_si128((const __m128i *)(const void *)(p))
#define ST16(p, v) _mm_storeu_si128((__m128i *)(void *)(p), (v))

/* Above this, `rep movsb` / `rep stosb` (fast on every CPU with ERMS). */
#define STRING_OP_MIN 4096

/* n <= 64, any overlap: every load happens before any store. */
static inline void copy_small(unsigned char *d, const unsigned char *s, size_t n)
{
    if (n >= 16) {
        if (n <= 32) {
            __m128i a = LD16(s), b = LD16(s + n - 16);
            ST16(d, a);
            ST16(d + n - 16, b);
        } else {
            __m128i a = LD16(s), b = LD16(s + 16);
            __m128i c = LD16(s + n - 32), e = LD16(s + n - 16);
            ST16(d, a);
            ST16(d + 16, b);
            ST16(d + n - 32, c);
            ST16(d + n - 16, e);
        }
    } else if (n >= 8) {
        uint64_t a = *(const u64u *)s, b = *(const u64u *)(s + n - 8);
        *(u64u *)d = a;
        *(u64u *)(d + n - 8) = b;
    } else if (n >= 4) {
        uint32_t a = *(const u32u *)s, b = *(const u32u *)(s + n - 4);
        *(u32u *)d = a;
        *(u32u *)(d + n - 4) = b;
    } else if (n >= 2) {
        uint16_t a = *(const u16u *)s, b = *(const u16u *)(s + n - 2);
        *(u16u *)d = a;
        *(u16u *)(d + n - 2) = b;
    } else if (n == 1) {
        *d = *s;
    }
}

/* n > 64, and d < s or the regions do not overlap: front to back. The last 16
 * bytes are loaded first, so a store never clobbers a source byte not yet read. */
static inline void copy_forward(unsigned char *d, const unsigned char *s, size_t n)
{
    __m128i tail = LD16(s + n - 16);
    size_t i = 0;
    for (; i + 32 <= n - 16; i += 32) {
        __m128i a = LD16(s + i), b = LD16(s + i + 16);
        ST16(d + i, a);
        ST16(d + i + 16, b);
    }
    for (; i < n - 16; i += 16)
        ST16(d + i, LD16(s + i));
    ST16(d + n - 16, tail);
}

/* n > 64 and d > s, overlapping: back to front, the first 16 bytes loaded first. */
static inline void copy_backward(unsigned char *d, const unsigned char *s, size_t n)
{
    __m128i head = LD16(s);
    size_t i = n;
    for (; i >= 16 + 32; i -= 32) {
        __m128i a = LD16(s + i - 16), b = LD16(s + i - 32);
        ST16(d + i - 16, a);
        ST16(d + i - 32, b);
    }
    for (; i > 16; i -= 16)
        ST16(d + i - 16, LD16(s + i - 16));
    ST16(d, head);
}

void *ployz_memcpy(void *restrict dst, const void *restrict src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (n <= 64) {
        copy_small(d, s, n);
    } else if (n < STRING_OP_MIN) {
        copy_forward(d, s, n);
    } else {
        __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    }
    return dst;
}

void *ployz_memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (n <= 64) {
        copy_small(d, s, n);
    } else if ((uintptr_t)d - (uintptr_t)s >= n) {
        /* d before s, or no overlap: forward is safe. */
        if (n >= STRING_OP_MIN && (uintptr_t)s - (uintptr_t)d >= n)
            __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
        else
            copy_forward(d, s, n);
    } else {
        copy_backward(d, s, n);
    }
    return dst;
}

void *ployz_memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    uint64_t b = (uint64_t)(unsigned char)c * 0x0101010101010101ull;
    if (n >= 16) {
        __m128i v = _mm_set1_epi8((char)c);
        if (n <= 32) {
            ST16(d, v);
            ST16(d + n - 16, v);
        } else if (n < STRING_OP_MIN) {
            size_t i = 0;
            for (; i + 16 < n; i += 16)
                ST16(d + i, v);
            ST16(d + n - 16, v);
        } else {
            size_t k = n;
            unsigned char *p = d;
            __asm__ volatile("rep stosb" : "+D"(p), "+c"(k) : "a"(c) : "memory");
        }
    } else if (n >= 8) {
        *(u64u *)d = b;
        *(u64u *)(d + n - 8) = b;
    } else if (n >= 4) {
        *(u32u *)d = (uint32_t)b;
        *(u32u *)(d + n - 4) = (uint32_t)b;
    } else if (n >= 2) {
        *(u16u *)d = (uint16_t)b;
        *(u16u *)(d + n - 2) = (uint16_t)b;
    } else if (n == 1) {
        *d = (unsigned char)c;
    }
    return dst;
}

/* The order of the first differing 8-byte words, as memcmp sees them. */
static inline int word_order(uint64_t a, uint64_t b)
{
    a = __builtin_bswap64(a);
    b = __builtin_bswap64(b);
    return a < b ? -1 : 1;
}

int ployz_memcmp(const void *va, const void *vb, size_t n)
{
    const unsigned char *a = va, *b = vb;
    size_t i = 0;
    if (n >= 16) {
        for (; i + 16 <= n; i += 16) {
            __m128i x = LD16(a + i), y = LD16(b + i);
            int eq = _mm_movemask_epi8(_mm_cmpeq_epi8(x, y));
            if (eq != 0xffff) {
                size_t at = i + (size_t)__builtin_ctz(~eq & 0xffff);
                return (int)a[at] - (int)b[at];
            }
        }
        if (i == n)
            return 0;
        /* The last 16 bytes again, overlapping what is already known equal. */
        i = n - 16;
        __m128i x = LD16(a + i), y = LD16(b + i);
        int eq = _mm_movemask_epi8(_mm_cmpeq_epi8(x, y));
        if (eq == 0xffff)
            return 0;
        size_t at = i + (size_t)__builtin_ctz(~eq & 0xffff);
        return (int)a[at] - (int)b[at];
    }
    if (n >= 8) {
        uint64_t x = *(const u64u *)a, y = *(const u64u *)b;
        if (x != y)
            return word_order(x, y);
        x = *(const u64u *)(a + n - 8);
        y = *(const u64u *)(b + n - 8);
        return x == y ? 0 : word_order(x, y);
    }
    for (; i < n; i++) {
        if (a[i] != b[i])
            return (int)a[i] - (int)b[i];
    }
    return 0;
}

void *memcpy(void *restrict dst, const void *restrict src, size_t n)
    __attribute__((alias("ployz_memcpy")));
void *memmove(void *dst, const void *src, size_t n) __attribute__((alias("ployz_memmove")));
void *memset(void *dst, int c, size_t n) __attribute__((alias("ployz_memset")));
int memcmp(const void *a, const void *b, size_t n) __attribute__((alias("ployz_memcmp")));
int bcmp(const void *a, const void *b, size_t n) __attribute__((alias("ployz_memcmp")));
