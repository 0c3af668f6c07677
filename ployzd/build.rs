//! Link flags for the `ployzd` executable (issue 16, footprint).

fn main() {
    // A static-pie keeps one relocation per pointer in its data (vtables,
    // string tables...) so that it can be loaded at a random address (ASLR).
    // Packed relative relocations (DT_RELR, applied by musl's static-pie
    // start-up code since musl 1.2.4) store those in ~1/50 of the space of
    // .rela.dyn entries: same relocations, same ASLR, a smaller file.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
