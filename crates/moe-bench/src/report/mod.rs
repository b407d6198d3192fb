//! Reports a person looks at: every scenario that takes `--report DIR` writes `report.json` (the
//! figures, with the machine's ceilings and the commit) and a self-contained `report.html`: a
//! table of the headline figures and SVG charts (no external files, no network). A small inline
//! script marks the page once every chart has a size, so a headless browser can tell a page that
//! rendered from one that did not.

mod bench;
pub mod charts;
mod loadgen;
mod placement;

pub use bench::bench_report;
pub use loadgen::loadgen_report;
pub use placement::placement_report;

use anyhow::Context;
use std::fmt::Write as _;
use std::path::Path;

/// One chart of a report.
pub struct Chart {
    pub svg: String,
    /// What the chart shows and how to read it.
    pub caption: String,
}

/// A report: title, headline rows (label, value), charts, and the figures as JSON.
pub struct Report {
    pub title: String,
    pub rows: Vec<(String, String)>,
    pub charts: Vec<Chart>,
    pub json: serde_json::Value,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The commit this binary was built from, when the build knew it (`MOE_COMMIT` at build time),
/// else what `git` says here, else "unknown".
pub fn commit() -> String {
    if let Some(c) = option_env!("MOE_COMMIT") {
        return c.to_string();
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

impl Report {
    /// The page: headline table, then each chart with its caption.
    pub fn html(&self) -> String {
        let mut h = String::new();
        let title = escape(&self.title);
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>\
             body{{font-family:sans-serif;max-width:800px;margin:2em auto;color:#222}}\
             table{{border-collapse:collapse;margin:1em 0}}td{{border-bottom:1px solid #ddd;padding:4px 12px}}\
             figure{{margin:2em 0}}figcaption{{color:#555;font-size:14px}}svg{{max-width:100%;height:auto}}\
             </style></head>\n<body data-charts=\"{}\">\n<h1>{title}</h1>\n<table>\n",
            self.charts.len()
        );
        for (k, v) in &self.rows {
            let _ = writeln!(h, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(v));
        }
        h.push_str("</table>\n");
        for c in &self.charts {
            let _ = writeln!(h, "<figure>{}<figcaption>{}</figcaption></figure>", c.svg, escape(&c.caption));
        }
        h.push_str(
            "<p>The figures: <code>report.json</code> beside this page.</p>\n<script>\n\
             // Marks the page once every chart has a size (a headless check reads data-rendered).\n\
             const drawn = [...document.querySelectorAll('figure svg')]\n\
             \x20 .filter(s => s.getBoundingClientRect().width > 0 && s.querySelector('text'));\n\
             document.body.dataset.rendered = String(drawn.length);\n</script>\n</body></html>\n",
        );
        h
    }

    /// Writes `report.json` and `report.html` into `dir` (created if missing).
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("report.json");
        std::fs::write(&json, serde_json::to_string_pretty(&self.json)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let html = dir.join("report.html");
        std::fs::write(&html, self.html()).with_context(|| format!("writing {}", html.display()))?;
        eprintln!("report: {}", html.display());
        Ok(())
    }
}

/// The JSON of an earlier report (`--from-json FILE`), to draw it again.
pub fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained_and_escapes_text() {
        let r = Report {
            title: "a <b> & c".into(),
            rows: vec![("x".into(), "1 < 2".into())],
            charts: vec![Chart { svg: "<svg></svg>".into(), caption: "cap".into() }],
            json: serde_json::json!({}),
        };
        let h = r.html();
        assert!(h.contains("a &lt;b&gt; &amp; c") && h.contains("1 &lt; 2"));
        assert!(h.contains("data-charts=\"1\"") && h.contains("<svg></svg>"));
        assert!(!h.contains("src=") && !h.contains("href="), "no external resources");
    }
}
