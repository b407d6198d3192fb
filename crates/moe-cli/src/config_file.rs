//! `--config FILE` (or `MOE_CONFIG`): a TOML file whose keys mirror the flags (`max-batch-tokens
//! = 256` or `max_batch_tokens = 256`; lists as arrays). Each key becomes the flag's `MOE_*`
//! environment default before the command line is parsed, so the order of precedence is:
//! command line, then environment, then the file. Unknown keys are an error naming the key.

use clap::CommandFactory;
use std::collections::BTreeSet;

/// Every `MOE_*` variable some flag reads.
fn known_env_vars<C: CommandFactory>() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, out: &mut BTreeSet<String>) {
        for a in cmd.get_arguments() {
            if let Some(env) = a.get_env() {
                out.insert(env.to_string_lossy().to_string());
            }
        }
        for s in cmd.get_subcommands() {
            walk(s, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&C::command(), &mut out);
    out
}

/// The config file named on the command line or in `MOE_CONFIG`.
fn config_path(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.to_string());
        }
    }
    std::env::var("MOE_CONFIG").ok()
}

fn value_text(key: &str, v: &toml::Value) -> anyhow::Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => {
            items.iter().map(|i| value_text(key, i)).collect::<anyhow::Result<Vec<_>>>()?.join(",")
        }
        _ => anyhow::bail!("config key {key:?}: tables and dates are not flag values"),
    })
}

/// Applies the config file (if any) as environment defaults. Call before parsing the CLI, while
/// the process has one thread.
pub fn apply<C: CommandFactory>(args: &[String]) -> anyhow::Result<()> {
    let Some(path) = config_path(args) else { return Ok(()) };
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("--config {path}: {e}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| anyhow::anyhow!("--config {path}: {e}"))?;
    let known = known_env_vars::<C>();
    for (key, value) in &table {
        let env = format!("MOE_{}", key.replace('-', "_").to_uppercase());
        anyhow::ensure!(known.contains(&env), "--config {path}: {key:?} is not a flag of moe");
        if std::env::var_os(&env).is_none() {
            // SAFETY-free in edition 2021; called before any thread is started.
            std::env::set_var(&env, value_text(key, value)?);
        }
    }
    Ok(())
}
