//! The `chaperone-sidecar` binary is linked with its code layout
//! (`hot-text.ld`, which `build.rs` passes to the linker on Linux): the
//! functions a profiled run executed, in an output section of their own
//! ahead of the rest of `.text`. Without it a sidecar keeps ≈ 6 MiB more of
//! the binary resident (bench/RESULTS.md); this test notices a build that
//! silently stopped applying it.

#![cfg(target_os = "linux")]

/// Name, address and size of each section of the ELF64 little-endian file
/// `elf`.
fn sections(elf: &[u8]) -> Vec<(String, u64, u64)> {
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) as usize;
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!((elf[4], elf[5]), (2, 1), "not ELF64 little-endian");
    let table = u64_at(0x28) as usize;
    let entry_size = u16_at(0x3a);
    let count = u16_at(0x3c);
    let names_index = u16_at(0x3e);
    let header = |i: usize| table + i * entry_size;
    let names = u64_at(header(names_index) + 0x18) as usize;
    (0..count)
        .map(|i| {
            let at = header(i);
            let name_at = names + u32_at(at);
            let len = elf[name_at..].iter().position(|&b| b == 0).unwrap();
            let name = String::from_utf8_lossy(&elf[name_at..name_at + len]).into_owned();
            (name, u64_at(at + 0x10), u64_at(at + 0x20))
        })
        .collect()
}

#[test]
fn the_profiled_functions_come_first_in_their_own_section() {
    if std::env::var("CHAPERONE_HOT_TEXT").is_ok_and(|v| v.trim() == "0") {
        eprintln!("CHAPERONE_HOT_TEXT=0: built without the code layout");
        return;
    }
    let binary = std::fs::read(env!("CARGO_BIN_EXE_chaperone-sidecar")).unwrap();
    let sections = sections(&binary);
    let find = |name: &str| {
        sections
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} section in chaperone-sidecar"))
    };
    let (_, profiled_at, profiled_size) = find(".text.profiled");
    let (_, text_at, _) = find(".text");
    assert!(*profiled_size > 0, "the layout matched no function");
    assert!(
        profiled_at + profiled_size <= *text_at,
        ".text.profiled ({profiled_at:#x}, {profiled_size:#x} bytes) is not ahead of .text ({text_at:#x})"
    );
}
