//! `bench-import`: the inventory import rate (issue 6: "100k rows should take seconds").
//! Generates an N-row inventory (mixed kinds, none due within 30 days so no reminder traffic
//! joins in), starts the release gateway, and times three imports: the whole file in one
//! `POST /api/v1/devices/import` (one transaction), the same file again (idempotent: all
//! unchanged), and `citywatch devices import` (the CLI, chunked, with its progress bar) on a
//! changed copy (all updated). Prints rows/s for each; passes or fails nothing on time.
//!
//! Usage: bench-import [ROWS=100000]   (scripts/bench-import builds the binaries first.)

use std::fmt::Write as _;
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context as _};
use citywatch_tests::{citywatch_bin, GatewayProcess};

fn inventory(rows: usize, crew: &str) -> String {
    let today = jiff::Zoned::now().date();
    let mut out = String::from("site,device,kind,location,install_date,last_inspection,inspection_interval_months,crew,phone,premises\n");
    for i in 0..rows {
        let kind = ["gas_detector", "smoke_detector", "siren_mount"][i % 3];
        // Installed 1–11 months ago, inspected 1–60 days ago: every due date is > 30 days out
        // (sirens: a 12-month interval instead of 6, so the season can be the only near date).
        let install = today.checked_sub(jiff::Span::new().days(31 + (i % 300) as i64)).unwrap_or(today);
        let last = today.checked_sub(jiff::Span::new().days(1 + (i % 30) as i64)).unwrap_or(today);
        let premises = if i % 2 == 0 { "commercial" } else { "residential" };
        let _ = writeln!(
            out,
            "site-{},dev-{i:06},{kind},\"Block {}, unit {}\",{install},{last},12,{crew},138{:08},{premises}",
            i % 50,
            i / 100,
            i % 100,
            i % 100_000_000
        );
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rows: usize = std::env::args().nth(1).map(|a| a.parse()).transpose().context("ROWS")?.unwrap_or(100_000);
    let gw = GatewayProcess::start_embedded("[inspections.siren_test]\nenabled = false\n").await?;
    let file = inventory(rows, "crew-1");
    println!("inventory: {rows} rows, {:.1} MB", file.len() as f64 / 1e6);

    let mut results = Vec::new();
    for (what, expect) in [("POST, new devices", "created"), ("POST, same file again", "unchanged")] {
        let started = Instant::now();
        let (status, report) = gw.post_raw("/api/v1/devices/import", "text/csv", file.as_bytes())?;
        let secs = started.elapsed().as_secs_f64();
        ensure!(status == 200, "import answered {status}: {report}");
        ensure!(report[expect] == rows, "expected {rows} {expect}: {}", report.to_string().chars().take(400).collect::<String>());
        results.push((what, secs));
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("inventory.csv");
    std::fs::write(&path, inventory(rows, "crew-2"))?;
    let started = Instant::now();
    let out = Command::new(citywatch_bin())
        .args(["devices", "import"])
        .arg(&path)
        .args(["--url", &format!("http://{}", gw.http_addr())])
        .output()?;
    let secs = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "citywatch devices import failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    ensure!(stdout.contains(&format!("{rows} updated")), "expected {rows} updated: {stdout}");
    results.push(("CLI (20k-row chunks), all updated", secs));

    println!("{:<36} {:>9} {:>12}", "import", "seconds", "rows/s");
    for (what, secs) in &results {
        println!("{what:<36} {secs:>9.3} {:>12.0}", rows as f64 / secs);
    }
    let json: Vec<String> = results.iter().map(|(w, s)| format!("{{\"import\":\"{w}\",\"seconds\":{s:.3},\"rows_per_s\":{:.0}}}", rows as f64 / s)).collect();
    println!("{{\"rows\":{rows},\"results\":[{}]}}", json.join(","));
    Ok(())
}
