//! Link flags for the `ployzd` executable (issue 16, footprint).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // A static-pie keeps one relocation per pointer in its data (vtables,
    // string tables...) so that it can be loaded at a random address (ASLR).
    // Packed relative relocations (DT_RELR, applied by musl's static-pie
    // start-up code since musl 1.2.4) store those in ~1/80 of the space of
    // .rela.dyn entries: same relocations, same ASLR, 0.9 MB less file
    // (BENCHMARKS.md, Footprint). GNU ld >= 2.38 and lld >= 15 know the flag.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
