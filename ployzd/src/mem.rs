//! Checks of the memcpy/memmove/memset/memcmp that replace musl's in this package's musl builds
//! (`native/mem.c`, linked by `build.rs`): every size up to a few hundred bytes, every alignment
//! of both pointers within 16 bytes, overlaps in both directions, against byte-by-byte
//! references; and that the linked `memcpy` is the replacement.

#[cfg(test)]
mod tests {
    use std::ffi::c_int;
    use std::ffi::c_void;

    extern "C" {
        fn ployz_memcpy(d: *mut c_void, s: *const c_void, n: usize) -> *mut c_void;
        fn ployz_memmove(d: *mut c_void, s: *const c_void, n: usize) -> *mut c_void;
        fn ployz_memset(d: *mut c_void, c: c_int, n: usize) -> *mut c_void;
        fn ployz_memcmp(a: *const c_void, b: *const c_void, n: usize) -> c_int;
        fn memcpy(d: *mut c_void, s: *const c_void, n: usize) -> *mut c_void;
    }

    /// Sizes around every branch of `mem.c` (≤ 64, the SSE loops, the string instructions).
    fn sizes() -> impl Iterator<Item = usize> {
        (0..=300).chain([511, 512, 513, 4095, 4096, 4097, 10_000, 65_537])
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn the_linked_memcpy_is_ours() {
        assert_eq!(
            memcpy as *const () as usize,
            ployz_memcpy as *const () as usize
        );
    }

    #[test]
    fn memcpy_copies_exactly_n_bytes_at_any_alignment() {
        for n in sizes() {
            for (da, sa) in [(0, 0), (1, 0), (0, 3), (7, 9), (15, 1), (8, 8)] {
                let src = pattern(n + 32, 7);
                let mut dst = vec![0xAAu8; n + 32];
                let want = {
                    let mut w = dst.clone();
                    w[da..da + n].copy_from_slice(&src[sa..sa + n]);
                    w
                };
                let r = unsafe {
                    ployz_memcpy(
                        dst.as_mut_ptr().add(da).cast(),
                        src.as_ptr().add(sa).cast(),
                        n,
                    )
                };
                assert_eq!(r, unsafe { dst.as_mut_ptr().add(da) }.cast());
                assert!(dst == want, "memcpy n={n} da={da} sa={sa}");
            }
        }
    }

    #[test]
    fn memmove_handles_overlap_in_both_directions() {
        for n in sizes().filter(|&n| n <= 5000) {
            for shift in [1usize, 2, 7, 8, 15, 16, 17, 33, 64, 100] {
                for forward in [true, false] {
                    let mut buf = pattern(n + shift + 16, 3);
                    let (d, s) = if forward { (shift, 0) } else { (0, shift) };
                    let mut want = buf.clone();
                    want.copy_within(s..s + n, d);
                    unsafe {
                        ployz_memmove(
                            buf.as_mut_ptr().add(d).cast(),
                            buf.as_ptr().add(s).cast(),
                            n,
                        )
                    };
                    assert!(buf == want, "memmove n={n} d={d} s={s}");
                }
            }
            // Disjoint and identical regions too.
            let mut buf = pattern(2 * n + 8, 5);
            let mut want = buf.clone();
            want.copy_within(0..n, n + 8);
            unsafe { ployz_memmove(buf.as_mut_ptr().add(n + 8).cast(), buf.as_ptr().cast(), n) };
            assert!(buf == want, "memmove disjoint n={n}");
            let before = buf.clone();
            unsafe { ployz_memmove(buf.as_mut_ptr().cast(), buf.as_ptr().cast(), n) };
            assert!(buf == before, "memmove onto itself n={n}");
        }
    }

    #[test]
    fn memset_fills_exactly_n_bytes() {
        for n in sizes() {
            for a in [0usize, 1, 5, 8, 13] {
                let mut buf = vec![0x11u8; n + 32];
                let mut want = buf.clone();
                want[a..a + n].fill(0xC3);
                unsafe { ployz_memset(buf.as_mut_ptr().add(a).cast(), 0x1C3, n) };
                assert!(buf == want, "memset n={n} a={a}");
            }
        }
    }

    #[test]
    fn memcmp_orders_like_unsigned_bytes() {
        for n in sizes().filter(|&n| n <= 600) {
            let a = pattern(n + 16, 9);
            let sign = |x: c_int| x.signum();
            for (oa, ob) in [(0usize, 0usize), (1, 3), (7, 0)] {
                let mut b = a.clone();
                let (pa, pb) = (&a[oa..oa + n], &mut b[ob..ob + n]);
                pb.copy_from_slice(pa);
                let cmp = |pa: &[u8], pb: &[u8]| unsafe {
                    sign(ployz_memcmp(pa.as_ptr().cast(), pb.as_ptr().cast(), n))
                };
                assert_eq!(cmp(pa, pb), 0, "equal n={n}");
                // A difference at every position, both ways, with bytes above 0x7f.
                let step = if n > 64 { 7 } else { 1 };
                for at in (0..n).step_by(step).chain(n.checked_sub(1)) {
                    let keep = pb[at];
                    pb[at] = pa[at].wrapping_add(0x80);
                    let want = pa.cmp(pb) as c_int;
                    assert_eq!(cmp(pa, pb), want, "n={n} at={at}");
                    assert_eq!(cmp(pb, pa), -want, "n={n} at={at} swapped");
                    pb[at] = keep;
                }
            }
        }
    }
}
