//! Link flags for the `ployzd` executable (issue 16, footprint).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PLOYZ_UNWIND_TABLES");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    fast_mem_functions();
    // A static-pie keeps one relocation per pointer in its data (vtables,
    // string tables...) so that it can be loaded at a random address (ASLR).
    // Packed relative relocations (DT_RELR, applied by musl's static-pie
    // start-up code since musl 1.2.4) store those in ~1/80 of the space of
    // .rela.dyn entries: same relocations, same ASLR, 0.9 MB less file
    // (BENCHMARKS.md, Footprint). GNU ld >= 2.38 and lld >= 15 know the flag.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");

    // Release builds drop the unwind tables (`.eh_frame`, 1.9 MB with its
    // index). The profile is panic=abort: nothing ever unwinds, so the tables
    // only served `RUST_BACKTRACE` (a panic still prints its message and
    // file:line) and unwinders of debuggers and profilers. rustc keeps them
    // even with `-C force-unwind-tables=no` (every call into the precompiled
    // std gets an abort-on-unwind pad, hence an FDE), so the linker discards
    // them: every object's `.eh_frame` but the C start files', whose
    // constructor registers the (now empty) table. Debug builds, and release
    // builds with PLOYZ_UNWIND_TABLES=1 (for perf or gdb), keep them.
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let keep = std::env::var_os("PLOYZ_UNWIND_TABLES").is_some_and(|v| v == "1");
    if release && !keep {
        let script = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
            .join("discard-unwind-tables.ld");
        std::fs::write(
            &script,
            "SECTIONS { /DISCARD/ : { EXCLUDE_FILE(*crtbeginS.o *crtendS.o *crtbegin.o *crtend.o) *(.eh_frame) } }\n\
             INSERT AFTER .text;\n",
        )
        .expect("write the linker script into OUT_DIR");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    }
}

/// musl's memcpy/memmove/memset/memcmp/bcmp replaced by `native/mem.c` (see there), in every
/// musl build of this package: the binaries, and the unit tests that check them (`src/mem.rs`).
fn fast_mem_functions() {
    println!("cargo:rerun-if-changed=native/mem.c");
    println!("cargo::rustc-check-cfg=cfg(ployz_fast_mem)");
    let musl = std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("musl");
    let x86_64 = std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64");
    if !(musl && x86_64) {
        return;
    }
    println!("cargo:rustc-cfg=ployz_fast_mem");
    cc::Build::new()
        .file("native/mem.c")
        .opt_level(2)
        .flag("-fno-builtin")
        .flag("-fno-tree-loop-distribute-patterns")
        .flag("-fno-stack-protector")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("ployzmem");
}
