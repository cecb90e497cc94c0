// Builds the kernel programs (mesh-ebpf) with the nightly toolchain and
// bpf-linker, into OUT_DIR, where datapath/ embeds them.
fn main() -> Result<(), String> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "mesh-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| format!("building the kernel programs (mesh-ebpf): {e:#}"))
}
