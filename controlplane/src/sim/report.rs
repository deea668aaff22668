//! `simulate --report DIR`: one self-contained HTML page (inline SVG, no script, nothing
//! fetched) with the run's summary and its series over simulated time, for an operator sizing a
//! fleet: is the queue draining, how much RPO slack is left, how busy the nodes are, how many
//! nodes the core asked for against how many there were, when failovers happened, and how far
//! the source hosts' read caps were pulled down.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

/// Samples over simulated time, one per [`super::SAMPLE_EVERY`].
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub hours: Vec<f64>,
    /// Backups waiting for a node, by class: critical, high, normal, low.
    pub waiting: [Vec<f64>; 4],
    /// RPO slack in hours (the RPO less the age of the latest snapshot): the least of all
    /// databases, and the tenth percentile.
    pub slack_min_h: Vec<f64>,
    pub slack_p10_h: Vec<f64>,
    /// Running shards over the shards the live nodes fit, percent.
    pub utilisation_percent: Vec<f64>,
    pub desired_nodes: Vec<f64>,
    pub live_nodes: Vec<f64>,
    /// Failovers since the previous sample.
    pub failovers: Vec<f64>,
    /// The source hosts' read caps, mean, MiB/s.
    pub host_cap_mib_s: Vec<f64>,
}

const CLASS_COLOURS: [(&str, &str); 4] =
    [("critical", "#c0392b"), ("high", "#e67e22"), ("normal", "#2980b9"), ("low", "#7f8c8d")];

/// Writes `DIR/index.html`; returns its path.
pub fn write(dir: &Path, summary: &serde_json::Value, s: &Series) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut page = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>cbcr fleet simulation</title>\
         <style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}\
         table{border-collapse:collapse}td{padding:2px 12px;border-bottom:1px solid #ddd}\
         h2{font-size:1.05em;margin-top:2em}p.note{color:#555;font-size:.9em}</style></head><body>\
         <h1>cbcr fleet simulation</h1>",
    );
    page.push_str("<table>");
    if let Some(fields) = summary.as_object() {
        for (k, v) in fields {
            let _ = write!(page, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(&v.to_string()));
        }
    }
    page.push_str("</table>");
    let waiting: Vec<_> = CLASS_COLOURS.iter().zip(&s.waiting).map(|((n, c), v)| (*n, *c, v.as_slice())).collect();
    section(&mut page, "Backups waiting for a node, by class", "backups", &s.hours, &waiting,
        "A queue that keeps growing means too few nodes (or source hosts at their caps); critical and high should drain within minutes.");
    section(
        &mut page,
        "RPO slack (hours)",
        "hours",
        &s.hours,
        &[("least", "#c0392b", &s.slack_min_h), ("10th percentile", "#2980b9", &s.slack_p10_h)],
        "Below zero, some database's latest snapshot is older than its RPO.",
    );
    section(
        &mut page,
        "Node utilisation (running shards / shards the live nodes fit)",
        "percent",
        &s.hours,
        &[("utilisation", "#27ae60", &s.utilisation_percent)],
        "Near 100% for long means backups wait for nodes; low means the fleet could be smaller.",
    );
    section(&mut page, "Desired and live nodes", "nodes", &s.hours,
        &[("desired", "#8e44ad", &s.desired_nodes), ("live", "#2c3e50", &s.live_nodes)],
        "Desired is what the core asks for: the steady rate the RPOs need plus the backlog, at the nodes' shown throughput and the target utilisation.");
    section(
        &mut page,
        "Failovers per sample",
        "failovers",
        &s.hours,
        &[("failovers", "#d35400", &s.failovers)],
        "A shard whose node died or was cut off, taken over by another node after its lease ended.",
    );
    section(&mut page, "Source hosts' read cap, mean (MiB/s)", "MiB/s", &s.hours,
        &[("read cap", "#16a085", &s.host_cap_mib_s)],
        "The AIMD loops lower a host's cap while its read latency is over the target: a busy production host is read more slowly.");
    page.push_str("</body></html>\n");
    let path = dir.join("index.html");
    std::fs::write(&path, page)?;
    Ok(path)
}

fn section(page: &mut String, title: &str, unit: &str, xs: &[f64], lines: &[(&str, &str, &[f64])], note: &str) {
    let _ = write!(page, "<h2>{}</h2>{}<p class=\"note\">{}</p>", escape(title), chart(unit, xs, lines), escape(note));
}

/// One line chart over simulated hours, as inline SVG.
fn chart(unit: &str, xs: &[f64], lines: &[(&str, &str, &[f64])]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 200.0;
    const LEFT: f64 = 60.0;
    const BOTTOM: f64 = 24.0;
    let x_max = xs.last().copied().unwrap_or(1.0).max(1e-9);
    let values = lines.iter().flat_map(|(_, _, v)| v.iter().copied()).filter(|v| v.is_finite());
    let (lo, hi) = values.fold((0f64, 0f64), |(l, h), v| (l.min(v), h.max(v)));
    let hi = if hi - lo < 1e-9 { lo + 1.0 } else { hi };
    let x = |t: f64| LEFT + t / x_max * (W - LEFT - 10.0);
    let y = |v: f64| 10.0 + (hi - v) / (hi - lo) * (H - 10.0 - BOTTOM);
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-size=\"11\">");
    for i in 0..=4 {
        let v = lo + (hi - lo) * f64::from(i) / 4.0;
        let _ = write!(svg, "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y0:.1}\" y2=\"{y0:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - 10.0, LEFT - 4.0, y(v) + 4.0, short(v), y0 = y(v));
    }
    for i in 0..=6 {
        let t = x_max * f64::from(i) / 6.0;
        let _ = write!(svg, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}h</text>", x(t), H - 6.0, short(t));
    }
    if lo < 0.0 {
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{z:.1}\" y2=\"{z:.1}\" stroke=\"#999\"/>",
            W - 10.0,
            z = y(0.0)
        );
    }
    for (i, (name, colour, v)) in lines.iter().enumerate() {
        let points: Vec<String> = xs
            .iter()
            .zip(v.iter())
            .filter(|(_, v)| v.is_finite())
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            points.join(" ")
        );
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{}</text>",
            LEFT + 10.0 + 110.0 * i as f64,
            20,
            escape(name)
        );
    }
    let _ = write!(svg, "<text x=\"4\" y=\"12\">{}</text></svg>", escape(unit));
    svg
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_stands_alone_and_plots_every_series() {
        let dir = std::env::temp_dir().join(format!("cbcr-report-test-{}", std::process::id()));
        let s = Series {
            hours: vec![0.0, 1.0, 2.0],
            waiting: [vec![1.0, 0.0, 0.0], vec![2.0; 3], vec![3.0; 3], vec![4.0; 3]],
            slack_min_h: vec![-0.5, 0.5, 1.0],
            slack_p10_h: vec![1.0; 3],
            utilisation_percent: vec![50.0; 3],
            desired_nodes: vec![3.0; 3],
            live_nodes: vec![4.0; 3],
            failovers: vec![0.0, 2.0, 0.0],
            host_cap_mib_s: vec![800.0, 600.0, 700.0],
        };
        let path = write(&dir, &serde_json::json!({"dbs": 3, "digest": "<x>"}), &s).unwrap();
        let page = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(page.matches("<svg").count(), 6);
        assert_eq!(page.matches("<polyline").count(), 4 + 2 + 1 + 2 + 1 + 1);
        assert!(page.contains("&lt;x&gt;"), "summary values are escaped");
        assert!(
            !page.contains("http://") || page.matches("http://").count() == 6,
            "nothing fetched: only SVG namespaces"
        );
        assert!(!page.contains("<script"));
    }
}
