//! `citywatch devices import FILE`: sends an inventory file to the running gateway's
//! `POST /api/v1/devices/import` in chunks of whole records (so a progress bar can move and
//! no request grows without bound), and maps each chunk's error lines back to the file's.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::inventory::RowError;
use super::{Error, Result};

/// A piece of the file: the header plus whole records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The file line of the chunk's first record.
    pub first_line: u64,
    /// Records in it.
    pub records: u64,
    /// Header line, then the records.
    pub body: Vec<u8>,
}

/// Splits a CSV file into chunks of at most `records_per_chunk` records, each with the header
/// in front. Records are cut at line ends outside quotes, so quoted newlines stay whole.
pub fn split_chunks(bytes: &[u8], records_per_chunk: usize) -> Vec<Chunk> {
    let per = records_per_chunk.max(1) as u64;
    // Each record: (first line, byte range).
    let mut records: Vec<(u64, usize, usize)> = Vec::new();
    let (mut start, mut line, mut start_line, mut in_quotes) = (0usize, 1u64, 1u64, false);
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'"' => in_quotes = !in_quotes,
            b'\n' => {
                line += 1;
                if !in_quotes {
                    records.push((start_line, start, i + 1));
                    start = i + 1;
                    start_line = line;
                }
            }
            _ => {}
        }
    }
    if start < bytes.len() {
        records.push((start_line, start, bytes.len()));
    }
    let Some(&(_, hs, he)) = records.first() else { return Vec::new() };
    let mut header = bytes[hs..he].to_vec();
    if !header.ends_with(b"\n") {
        header.push(b'\n');
    }
    let mut chunks: Vec<Chunk> = Vec::new();
    for &(first, s, e) in records.iter().skip(1) {
        let new_chunk = chunks.last().is_none_or(|c| c.records >= per);
        if new_chunk {
            chunks.push(Chunk { first_line: first, records: 0, body: header.clone() });
        }
        if let Some(c) = chunks.last_mut() {
            c.body.extend_from_slice(&bytes[s..e]);
            if !c.body.ends_with(b"\n") {
                c.body.push(b'\n');
            }
            c.records += 1;
        }
    }
    if chunks.is_empty() {
        chunks.push(Chunk { first_line: 2, records: 0, body: header });
    }
    chunks
}

/// The gateway's answer to one chunk.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChunkReport {
    pub imported: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub rejected: u64,
    pub errors: Vec<RowError>,
}

/// What the whole file did.
#[derive(Debug, Clone, Default)]
pub struct FileReport {
    pub imported: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub rejected: u64,
    /// With file line numbers.
    pub errors: Vec<RowError>,
    pub seconds: f64,
}

/// Imports `bytes` through `base_url` (e.g. "http://127.0.0.1:8080"), with a progress bar on
/// stderr when it is a terminal.
pub async fn import(base_url: &str, token: Option<&str>, bytes: &[u8], records_per_chunk: usize) -> Result<FileReport> {
    let started = std::time::Instant::now();
    let chunks = split_chunks(bytes, records_per_chunk);
    let total: u64 = chunks.iter().map(|c| c.records).sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let url = format!("{}/api/v1/devices/import", base_url.trim_end_matches('/'));
    // The gateway's one HTTP client setup: rustls with ring (reqwest has no provider of its own).
    let parsed = reqwest::Url::parse(&url).map_err(|e| Error::Invalid(format!("--url {base_url:?}: {e}")))?;
    let client = crate::http_client::build(&parsed, Duration::from_secs(300), None).map_err(|e| Error::Invalid(format!("HTTP client: {e}")))?;
    let mut report = FileReport::default();
    for chunk in chunks {
        let mut request = client.post(&url).header(reqwest::header::CONTENT_TYPE, "text/csv").body(chunk.body);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = request.send().await.map_err(|e| Error::Invalid(format!("POST {url}: {e} (is the gateway running?)")))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| Error::Invalid(format!("POST {url}: {e}")))?;
        if !status.is_success() {
            return Err(Error::Invalid(format!("POST {url}: {status}: {text}")));
        }
        let r: ChunkReport = serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("POST {url}: unexpected answer ({e}): {text}")))?;
        let header_error = r.errors.iter().find(|e| e.line == 1).cloned();
        if let Some(e) = header_error {
            bar.finish_and_clear();
            return Err(Error::Invalid(format!("line 1: {}", e.reason)));
        }
        report.imported += r.imported;
        report.created += r.created;
        report.updated += r.updated;
        report.unchanged += r.unchanged;
        report.rejected += r.rejected;
        // Chunk line 2 is the chunk's first record.
        report.errors.extend(r.errors.into_iter().map(|e| RowError { line: e.line + chunk.first_line - 2, reason: e.reason }));
        bar.inc(chunk.records);
    }
    bar.finish_and_clear();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_the_header_and_whole_quoted_records() {
        let text = b"h1,h2\na,1\n\"b\nmulti\",2\nc,3\nd,4";
        let chunks = split_chunks(text, 2);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].body, b"h1,h2\na,1\n\"b\nmulti\",2\n");
        assert_eq!(chunks[0].first_line, 2);
        assert_eq!(chunks[1].body, b"h1,h2\nc,3\nd,4\n");
        assert_eq!(chunks[1].first_line, 5, "the quoted record spans lines 3–4");
        assert_eq!(chunks.iter().map(|c| c.records).sum::<u64>(), 4);
        assert_eq!(split_chunks(b"", 10), Vec::new());
        assert_eq!(split_chunks(b"h\n", 10).len(), 1, "a header alone still goes, to be checked");
    }
}
