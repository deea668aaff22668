//! A self-contained HTML report with SVG plots, made from `report.json`.

use std::fmt::Write;

use serde_json::Value;

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];

type Series = (String, Vec<(f64, f64)>);

/// Renders the report.
pub(crate) fn html(r: &Value) -> String {
    let phases = r["phases"].as_array().cloned().unwrap_or_default();
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=utf-8><title>cbcr perf report</title><style>\
         body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}\
         svg{background:#fafafa;border:1px solid #ddd;margin:8px 0}</style></head><body>",
    );
    let _ =
        write!(
        h,
        "<h1>cbcr performance report</h1><p>{} cores available; synthetic database ratio {}; wall time {:.0} s; {}</p>",
        r["cores_available"], r["ratio"], r["wall_seconds"].as_f64().unwrap_or(0.0), r["created"].as_str().unwrap_or("")
    );
    h += "<h2>Stage limits (one core, same data, same run)</h2><table><tr>";
    let limits = &r["stage_limits"];
    let keys = [
        "generate_gbps",
        "read_gbps",
        "chunk_gbps",
        "hash_gbps",
        "compress_gbps",
        "decompress_gbps",
        "backup_core_limit_gbps",
        "zstd1_ratio",
    ];
    for k in keys {
        let _ = write!(h, "<th>{}</th>", k.trim_end_matches("_gbps"));
    }
    h += "</tr><tr>";
    for k in keys {
        let _ = write!(h, "<td>{:.2}</td>", limits[k].as_f64().unwrap_or(f64::NAN));
    }
    h += "</tr></table><p>GB/s except the ratio. The backup limit of one core is 1 / (generate + chunk + hash + compress per byte): on a generated source, generating the bytes is the read. <i>read</i> is touching pages already in memory.</p>";

    h += "<h2>Phases</h2><table><tr><th>phase</th><th>size</th><th>cores</th><th>seconds</th><th>GB/s</th><th>efficiency</th><th>peak RSS MiB</th></tr>";
    for p in &phases {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.3}</td><td>{}</td><td>{:.1}</td></tr>",
            p["phase"].as_str().unwrap_or(""),
            gib(p["size"].as_f64().unwrap_or(0.0)),
            p["cores"],
            p["seconds"].as_f64().unwrap_or(0.0),
            p["gbps"].as_f64().unwrap_or(0.0),
            p["efficiency"].as_f64().map_or("".into(), |e| format!("{e:.2}")),
            p["peak_rss"].as_f64().unwrap_or(0.0) / 1048576.0
        );
    }
    h += "</table>";

    for name in ["full", "incremental", "restore", "restore-compare", "verify"] {
        let of_phase: Vec<&Value> = phases.iter().filter(|p| p["phase"] == name).collect();
        if of_phase.is_empty() {
            continue;
        }
        let label = |p: &Value| format!("{} {} cores", gib(p["size"].as_f64().unwrap_or(0.0)), p["cores"]);
        let throughput: Vec<Series> = of_phase.iter().map(|p| (label(p), rate(&p["progress"]))).collect();
        let rss: Vec<Series> = of_phase
            .iter()
            .map(|p| (label(p), samples(&p["samples"], |s| s["rss"].as_f64().unwrap_or(0.0) / 1048576.0)))
            .collect();
        let _ = write!(h, "<h2>{name}</h2>");
        h += &chart(&format!("{name}: throughput over time"), "seconds", "GB/s", &throughput);
        h += &chart(&format!("{name}: RSS over time"), "seconds", "MiB", &rss);
    }

    h += "<h2>Stage latency per chunk (full backups, all cores merged)</h2><table><tr><th>run</th><th>stage</th><th>count</th><th>p50 µs</th><th>p99 µs</th><th>p99.9 µs</th><th>max µs</th></tr>";
    let mut bars: Vec<Series> = vec![];
    for p in phases.iter().filter(|p| p["phase"] == "full") {
        let all = &p["summary"]["stage_latency_us"]["all"];
        let run = format!("{} {} cores", gib(p["size"].as_f64().unwrap_or(0.0)), p["cores"]);
        let mut pts = vec![];
        for (i, stage) in ["chunk", "hash", "compress", "write"].iter().enumerate() {
            let st = &all[*stage];
            let _ = write!(
                h,
                "<tr><td>{run}</td><td>{stage}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td></tr>",
                st["count"], st["p50_us"].as_f64().unwrap_or(0.0), st["p99_us"].as_f64().unwrap_or(0.0),
                st["p999_us"].as_f64().unwrap_or(0.0), st["max_us"].as_f64().unwrap_or(0.0)
            );
            pts.push((i as f64, st["p99_us"].as_f64().unwrap_or(0.0)));
        }
        bars.push((run, pts));
    }
    h += "</table>";
    h += &chart("p99 latency per stage (0 chunk, 1 hash, 2 compress, 3 write)", "stage", "µs", &bars);

    // Scaling with cores (per size) and with size (per core count), full backups.
    let full: Vec<&Value> = phases.iter().filter(|p| p["phase"] == "full").collect();
    let mut by_size: Vec<Series> = vec![];
    let mut by_cores: Vec<Series> = vec![];
    let mut rss_by_size: Vec<Series> = vec![];
    for p in &full {
        let (size, cores) = (p["size"].as_f64().unwrap_or(0.0), p["cores"].as_f64().unwrap_or(0.0));
        let gbps = p["gbps"].as_f64().unwrap_or(0.0);
        push(&mut by_size, gib(size), (cores, gbps));
        push(&mut by_cores, format!("{cores} cores"), (size / 1073741824.0, gbps));
        push(
            &mut rss_by_size,
            format!("{cores} cores"),
            (size / 1073741824.0, p["peak_rss"].as_f64().unwrap_or(0.0) / 1048576.0),
        );
    }
    h += "<h2>Scaling</h2>";
    h += &chart("full backup: throughput against cores", "cores", "GB/s", &by_size);
    h += &chart("full backup: throughput against size", "GiB", "GB/s", &by_cores);
    h += &chart("full backup: peak RSS against size", "GiB", "MiB", &rss_by_size);
    h += "</body></html>\n";
    h
}

fn push(series: &mut Vec<Series>, name: String, point: (f64, f64)) {
    match series.iter_mut().find(|s| s.0 == name) {
        Some(s) => s.1.push(point),
        None => series.push((name, vec![point])),
    }
}

fn gib(bytes: f64) -> String {
    if bytes >= 1073741824.0 {
        format!("{:.0} GiB", bytes / 1073741824.0)
    } else {
        format!("{:.0} MiB", bytes / 1048576.0)
    }
}

fn samples(v: &Value, f: impl Fn(&Value) -> f64) -> Vec<(f64, f64)> {
    v.as_array().map_or(vec![], |a| a.iter().map(|s| (s["t"].as_f64().unwrap_or(0.0), f(s))).collect())
}

/// GB/s between consecutive progress events.
fn rate(v: &Value) -> Vec<(f64, f64)> {
    let pts = samples(v, |s| s["bytes_done"].as_f64().unwrap_or(0.0));
    pts.windows(2).map(|w| (w[1].0, (w[1].1 - w[0].1).max(0.0) / (w[1].0 - w[0].0).max(1e-3) / 1e9)).collect()
}

/// A line chart; every series a polyline with dots.
fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h, l, b, t, r) = (720.0, 300.0, 60.0, 40.0, 30.0, 170.0);
    let all: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.1.iter().copied()).filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    if all.is_empty() {
        return format!("<p>{title}: no samples</p>");
    }
    let x_min = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min).min(0.0);
    let x_max = all.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max).max(x_min + 1e-9);
    let y_max = all.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    let px = |x: f64| l + (x - x_min) / (x_max - x_min) * (w - l - r);
    let py = |y: f64| h - b - y / y_max * (h - b - t);
    let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-size='11'>");
    let _ = write!(s, "<text x='{l}' y='18' font-size='13' font-weight='bold'>{title}</text>");
    let _ = write!(s, "<line x1='{l}' y1='{}' x2='{}' y2='{}' stroke='#333'/>", h - b, w - r, h - b);
    let _ = write!(s, "<line x1='{l}' y1='{t}' x2='{l}' y2='{}' stroke='#333'/>", h - b);
    for i in 0..=4 {
        let (xv, yv) = (x_min + (x_max - x_min) * i as f64 / 4.0, y_max * i as f64 / 4.0);
        let _ = write!(s, "<text x='{:.1}' y='{}' text-anchor='middle'>{}</text>", px(xv), h - b + 14.0, tick(xv));
        let _ = write!(s, "<text x='{}' y='{:.1}' text-anchor='end'>{}</text>", l - 4.0, py(yv) + 4.0, tick(yv));
        let _ = write!(s, "<line x1='{l}' y1='{:.1}' x2='{}' y2='{:.1}' stroke='#e4e4e4'/>", py(yv), w - r, py(yv));
    }
    let _ = write!(s, "<text x='{:.1}' y='{}' text-anchor='middle'>{x_label}</text>", (l + w - r) / 2.0, h - 6.0);
    let _ = write!(
        s,
        "<text x='14' y='{:.1}' transform='rotate(-90 14 {:.1})' text-anchor='middle'>{y_label}</text>",
        (t + h - b) / 2.0,
        (t + h - b) / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let line: Vec<String> = pts.iter().map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1))).collect();
        let _ = write!(s, "<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{}'/>", line.join(" "));
        for p in pts {
            let _ = write!(s, "<circle cx='{:.1}' cy='{:.1}' r='2.5' fill='{color}'/>", px(p.0), py(p.1));
        }
        let ly = t + 14.0 * i as f64 + 10.0;
        let _ = write!(s, "<rect x='{}' y='{}' width='10' height='10' fill='{color}'/>", w - r + 10.0, ly - 9.0);
        let _ = write!(s, "<text x='{}' y='{ly}'>{name}</text>", w - r + 24.0);
    }
    s + "</svg>"
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}
