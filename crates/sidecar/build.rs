//! Link flags of the `chaperone-sidecar` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target_os == "linux" && target_env == "gnu" {
        // Packed relative relocations (DT_RELR): the dynamic loader reads
        // ≈ 11 KiB of them at start instead of ≈ 1 MiB of `.rela.dyn`, and
        // that megabyte no longer stays resident in every sidecar (the
        // sidecar's memory goal; bench/RESULTS.md). The binary stays
        // position-independent (ASLR unchanged). GNU ld ≥ 2.38 and glibc
        // ≥ 2.36 (Debian 12, the images' base) use it; an older linker warns
        // and ignores it, and ld leaves it out where the glibc linked against
        // lacks it.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
