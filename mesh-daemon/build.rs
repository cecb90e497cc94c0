// Builds the kernel programs (mesh-ebpf) with the nightly toolchain and
// bpf-linker, into OUT_DIR, where datapath/ embeds them.
fn main() -> Result<(), String> {
    // Read when the script runs, not when it was compiled: a script built
    // in another work tree sharing this target directory still looks here.
    let dir = std::env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?;
    let root = format!("{dir}/../mesh-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "mesh-ebpf", root_dir: &root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| format!("building the kernel programs (mesh-ebpf): {e:#}"))
}
