// Builds the kernel programs (mesh-ebpf) with the nightly toolchain and
// bpf-linker, into OUT_DIR, where datapath/ embeds them.
fn main() -> Result<(), String> {
    // A fuzzing build (cargo fuzz sets `--cfg fuzzing`) drives parsers and
    // never loads the kernel programs: it embeds an empty object (loading
    // it fails) and spends no time on a second toolchain's build.
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?;
        return std::fs::write(format!("{out}/mesh"), b"").map_err(|e| format!("writing {out}/mesh: {e}"));
    }
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
