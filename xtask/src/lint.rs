//! The conventions as gates of `cargo xtask test`: formatting, clippy
//! with warnings denied (and the workspace lints, e.g. every `unsafe`
//! block documented), and cargo-deny's license and ban checks.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// `cargo fmt --check` on the workspace at `root`.
pub fn check_formatting(root: &Path) -> anyhow::Result<()> {
    let out = crate::cargo()
        .args(["fmt", "--all", "--check"])
        .current_dir(root)
        .output()
        .context("running cargo fmt (rustup component add rustfmt)")?;
    if !out.status.success() {
        let diff = String::from_utf8_lossy(&out.stdout);
        let files: Vec<&str> = diff.lines().filter_map(|l| l.strip_prefix("Diff in ")).collect();
        bail!(
            "cargo fmt --check: {} place(s) are not formatted ({}); run `cargo fmt`\n{}",
            files.len(),
            files.join(", "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `cargo clippy --all-targets --features <FEATURES> -- -D warnings`.
pub fn check_clippy(root: &Path) -> anyhow::Result<()> {
    let status = crate::cargo()
        .args(["clippy", "--quiet", "--all-targets", "--features"])
        // The fuzz entry points are linted with the rest.
        .arg(format!("{},mesh-daemon/fuzzing", crate::FEATURES))
        .args(["--", "-D", "warnings"])
        .current_dir(root)
        .status()
        .context("running cargo clippy (rustup component add clippy)")?;
    if !status.success() {
        bail!("cargo clippy found warnings (above); fix them, the tests do not run until it is clean");
    }
    Ok(())
}

/// `cargo deny check licenses bans` (deny.toml). Advisories are not
/// checked: their database is fetched from GitHub, which these machines
/// cannot reach.
pub fn check_deny(root: &Path) -> anyhow::Result<()> {
    let status = Command::new("cargo-deny")
        .args(["--all-features", "check", "licenses", "bans"])
        .current_dir(root)
        .status()
        .context("running cargo-deny (cargo xtask setup installs it)")?;
    if !status.success() {
        bail!("cargo deny found a license or ban problem (above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crate of its own (not in the workspace) with one file.
    fn crate_with(name: &str, main: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-lint-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(
            dir.join("Cargo.toml"),
            format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n"),
        )
        .unwrap();
        std::fs::write(dir.join("src/main.rs"), main).unwrap();
        dir
    }

    #[test]
    fn a_misformatted_file_fails_the_formatting_gate() {
        let bad = crate_with("misformatted", "fn main(){let x=1;println!(\"{}\",x);}\n");
        let e = check_formatting(&bad).unwrap_err().to_string();
        assert!(e.contains("not formatted") && e.contains("run `cargo fmt`"), "{e}");
        let good = crate_with("formatted", "fn main() {\n    let x = 1;\n    println!(\"{}\", x);\n}\n");
        check_formatting(&good).unwrap();
        let _ = std::fs::remove_dir_all(bad);
        let _ = std::fs::remove_dir_all(good);
    }
}
