//! `ployzd` and `ployzctl` are static executables: no ELF interpreter, so
//! they run on any Linux without a matching libc (or libseccomp) installed.

use ployz_tests::bin;

/// Whether an ELF64 little-endian executable asks for an interpreter
/// (`PT_INTERP`), i.e. is dynamically linked.
fn has_interpreter(elf: &[u8]) -> Result<bool, String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(
            elf.get(at..at + 4)
                .ok_or("truncated program headers")?
                .try_into()
                .unwrap(),
        );
        if p_type == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

#[test]
fn binaries_are_static() {
    for name in ["ployzd", "ployzctl"] {
        let path = bin(name);
        let elf = std::fs::read(&path).unwrap();
        let dynamic = has_interpreter(&elf).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            !dynamic,
            "{} is dynamically linked: build for x86_64-unknown-linux-musl (.cargo/config.toml does; \
             install the target with scripts/setup)",
            path.display()
        );
    }
}

#[test]
fn the_elf_check_tells_dynamic_from_static() {
    // /bin/sh on Debian is dynamic; busybox-static is not.
    let sh = std::fs::read("/bin/sh").unwrap();
    assert!(has_interpreter(&sh).unwrap());
    let bb = std::fs::read("/bin/busybox").unwrap();
    assert!(!has_interpreter(&bb).unwrap());
    assert!(has_interpreter(
        b"not an elf at all, just some bytes...................................."
    )
    .is_err());
}
