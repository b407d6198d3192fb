//! Records the commit the binary is built from as `MOE_COMMIT` (unless the environment sets it),
//! so a report names the code that ran, also where the binary is carried to a machine whose
//! checkout sits at another commit (a lent GPU host).

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=MOE_COMMIT");
    if std::env::var_os("MOE_COMMIT").is_some() {
        return;
    }
    // Rebuilt when HEAD moves: HEAD itself and the branch file it names.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = Path::new(&dir);
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={}", dir.join(branch).display());
        }
    }
    if let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) {
        println!("cargo:rustc-env=MOE_COMMIT={commit}");
    }
}
