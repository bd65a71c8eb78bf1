//! The crews' inventory file: CSV with a header row naming the columns `site, device, kind,
//! location, install_date, last_inspection, inspection_interval_months, crew, phone` (any
//! order; an optional `premises` = commercial | residential; optional `lat`, `lon` in decimal
//! degrees, WGS-84 as GPS gives them — the dashboard converts to GCJ-02 only to draw over a
//! GCJ-02 tile server). Parsing and validation only:
//! pure, no I/O, never panics on any input (a fuzz target calls [`parse_inventory`]).

use std::collections::HashMap;

use citywatch_edge::wire::DeviceKind;
use jiff::civil::Date;
use serde::{Deserialize, Serialize};

/// Columns every file must have.
pub const COLUMNS: [&str; 9] =
    ["site", "device", "kind", "location", "install_date", "last_inspection", "inspection_interval_months", "crew", "phone"];
/// Columns a file may add.
pub const OPTIONAL_COLUMNS: [&str; 3] = ["premises", "lat", "lon"];
/// Longest text field accepted.
pub const MAX_FIELD: usize = 200;

/// Where a gas detector is installed: its end of life depends on it (CJJ/T 146-2011).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Premises {
    /// Restaurants, shops, plant rooms (the default: most kitchens watched are restaurants).
    #[default]
    Commercial,
    Residential,
}

impl Premises {
    pub fn as_str(self) -> &'static str {
        match self {
            Premises::Commercial => "commercial",
            Premises::Residential => "residential",
        }
    }

    pub fn parse(s: &str) -> Option<Premises> {
        match s {
            "commercial" => Some(Premises::Commercial),
            "residential" => Some(Premises::Residential),
            _ => None,
        }
    }
}

/// Where a device is: WGS-84 decimal degrees (the datum of GPS and of the inventory file).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatLon {
    pub lat: f64,
    pub lon: f64,
}

// Both are finite (checked on parse), so equality is reflexive.
impl Eq for LatLon {}

impl LatLon {
    /// Both given or both empty; latitude −90…90, longitude −180…180.
    fn parse(lat: &str, lon: &str) -> Result<Option<LatLon>, String> {
        let coord = |name: &str, text: &str, limit: f64| match text.parse::<f64>() {
            Ok(v) if v.is_finite() && v.abs() <= limit => Ok(v),
            _ => Err(format!("{name}: {text:?} is not a WGS-84 {name} in decimal degrees (−{limit}…{limit})")),
        };
        match (lat, lon) {
            ("", "") => Ok(None),
            ("", _) => Err("lat: required when lon is given".into()),
            (_, "") => Err("lon: required when lat is given".into()),
            (a, o) => Ok(Some(LatLon { lat: coord("lat", a, 90.0)?, lon: coord("lon", o, 180.0)? })),
        }
    }
}

/// One valid inventory line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub line: u64,
    pub site: String,
    pub device: String,
    pub kind: DeviceKind,
    pub location: String,
    pub install_date: Date,
    /// Absent: never inspected since installation.
    pub last_inspection: Option<Date>,
    /// Absent: the kind's configured interval.
    pub interval_months: Option<u32>,
    pub crew: String,
    /// As given (stored so the crew can be called; shown only masked).
    pub phone: String,
    pub premises: Premises,
    /// Absent when the file has no `lat`/`lon` (or leaves them empty).
    pub position: Option<LatLon>,
}

/// A rejected line and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowError {
    pub line: u64,
    pub reason: String,
}

fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_phone(s: &str) -> bool {
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let rest_ok = s.bytes().enumerate().all(|(i, b)| b.is_ascii_digit() || b == b' ' || b == b'-' || (b == b'+' && i == 0));
    (7..=15).contains(&digits) && rest_ok
}

fn date(column: &str, text: &str) -> Result<Date, String> {
    let ok = text.len() == 10 && text.as_bytes().get(4) == Some(&b'-') && text.as_bytes().get(7) == Some(&b'-');
    text.parse::<Date>()
        .ok()
        .filter(|_| ok)
        .ok_or_else(|| format!("{column}: {text:?} is not a date like 2025-12-20"))
}

/// Parses and validates an inventory file. Returns the valid rows and one error per rejected
/// line, with its 1-based line number (a device listed twice is an error on its later line).
pub fn parse_inventory(bytes: &[u8]) -> (Vec<Row>, Vec<RowError>) {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).trim(csv::Trim::All).from_reader(bytes);
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut records = reader.byte_records();
    let header = match records.next() {
        None => {
            errors.push(RowError { line: 1, reason: "empty file: expected a header row".into() });
            return (rows, errors);
        }
        Some(Err(e)) => {
            errors.push(RowError { line: 1, reason: format!("header: {}", csv_reason(&e)) });
            return (rows, errors);
        }
        Some(Ok(h)) => h,
    };
    let mut index: ColumnIndex = Default::default();
    for (i, name) in header.iter().enumerate() {
        let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
        let Some(slot) = column_slot(&name) else {
            errors.push(RowError { line: 1, reason: format!("header: unknown column {name:?}; columns are {}", COLUMNS.join(", ")) });
            return (rows, errors);
        };
        if index[slot].replace(i).is_some() {
            errors.push(RowError { line: 1, reason: format!("header: column {name:?} appears twice") });
            return (rows, errors);
        }
    }
    let width = header.len();
    if let Some(missing) = COLUMNS.iter().enumerate().find(|(slot, _)| index[*slot].is_none()).map(|(_, c)| c) {
        errors.push(RowError { line: 1, reason: format!("header: missing column {missing:?}") });
        return (rows, errors);
    }
    let mut seen: HashMap<String, u64> = HashMap::new();
    // Line numbers from byte offsets (the CSV reader's own count skips blank lines).
    let mut lines = LineCounter { bytes, offset: 0, line: 1 };
    let mut line = 1u64;
    for record in records {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                line = e.position().map_or(line + 1, |p| lines.at(p.byte()));
                errors.push(RowError { line, reason: csv_reason(&e) });
                continue;
            }
        };
        line = record.position().map_or(line + 1, |p| lines.at(p.byte()));
        if record.iter().all(|f| f.is_empty()) {
            continue;
        }
        match parse_row(&record, &index, width, line) {
            Ok(row) => {
                if let Some(first) = seen.get(&row.device) {
                    errors.push(RowError { line, reason: format!("device {:?} already on line {first}", row.device) });
                    continue;
                }
                seen.insert(row.device.clone(), line);
                rows.push(row);
            }
            Err(reason) => errors.push(RowError { line, reason }),
        }
    }
    (rows, errors)
}

/// Counts newlines up to increasing byte offsets.
struct LineCounter<'a> {
    bytes: &'a [u8],
    offset: usize,
    line: u64,
}

impl LineCounter<'_> {
    /// The 1-based line of `byte` (offsets must not decrease).
    fn at(&mut self, byte: u64) -> u64 {
        let mut to = usize::try_from(byte).unwrap_or(usize::MAX).min(self.bytes.len()).max(self.offset);
        // The reader's offset is where blank lines before the record begin: skip them.
        while self.bytes.get(to).is_some_and(|b| *b == b'\n' || *b == b'\r') {
            to += 1;
        }
        self.line += self.bytes[self.offset..to].iter().filter(|b| **b == b'\n').count() as u64;
        self.offset = to;
        self.line
    }
}

fn csv_reason(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".into(),
        _ => format!("unreadable CSV: {e}"),
    }
}

/// Where each known column is in the file: COLUMNS in order, then OPTIONAL_COLUMNS.
type ColumnIndex = [Option<usize>; COLUMNS.len() + OPTIONAL_COLUMNS.len()];

fn column_slot(name: &str) -> Option<usize> {
    COLUMNS.iter().chain(OPTIONAL_COLUMNS.iter()).position(|c| *c == name)
}

fn parse_row(record: &csv::ByteRecord, index: &ColumnIndex, width: usize, line: u64) -> Result<Row, String> {
    if record.len() != width {
        return Err(format!("{} fields, the header has {width}", record.len()));
    }
    let mut fields: [&str; COLUMNS.len() + OPTIONAL_COLUMNS.len()] = [""; COLUMNS.len() + OPTIONAL_COLUMNS.len()];
    for (slot, at) in index.iter().enumerate() {
        let Some(i) = at else { continue };
        let name = COLUMNS.iter().chain(OPTIONAL_COLUMNS.iter()).nth(slot).copied().unwrap_or("?");
        let raw = record.get(*i).unwrap_or_default();
        let text = std::str::from_utf8(raw).map_err(|_| format!("{name}: not valid UTF-8"))?;
        if text.len() > MAX_FIELD && text.chars().count() > MAX_FIELD {
            return Err(format!("{name}: longer than {MAX_FIELD} characters"));
        }
        if text.chars().any(char::is_control) {
            return Err(format!("{name}: contains control characters"));
        }
        fields[slot] = text;
    }
    let get = |name: &str| column_slot(name).map_or("", |i| fields[i]);
    let required = |name: &str| {
        let v = get(name);
        if v.is_empty() {
            Err(format!("{name}: required"))
        } else {
            Ok(v)
        }
    };
    let site = required("site")?;
    if !valid_id(site) {
        return Err(format!("site: {site:?} must be 1–64 of A-Z a-z 0-9 _ -"));
    }
    let device = required("device")?;
    if !valid_id(device) {
        return Err(format!("device: {device:?} must be 1–64 of A-Z a-z 0-9 _ -"));
    }
    let kind_text = required("kind")?;
    let kind = DeviceKind::parse(kind_text)
        .ok_or_else(|| format!("kind: {kind_text:?} is not one of gas_detector, smoke_detector, siren_mount"))?;
    let location = required("location")?;
    let install_date = date("install_date", required("install_date")?)?;
    let last_inspection = match get("last_inspection") {
        "" => None,
        t => Some(date("last_inspection", t)?),
    };
    if last_inspection.is_some_and(|l| l < install_date) {
        return Err("last_inspection: before install_date".into());
    }
    let interval_months = match get("inspection_interval_months") {
        "" => None,
        t => match t.parse::<u32>() {
            Ok(m) if (1..=120).contains(&m) => Some(m),
            _ => return Err(format!("inspection_interval_months: {t:?} must be a whole number of months, 1–120")),
        },
    };
    let crew = required("crew")?;
    let phone = required("phone")?;
    if !valid_phone(phone) {
        // The phone itself is not repeated: error lists are shown and logged.
        return Err(format!("phone: {} is not a phone number (7–15 digits, optional leading +)", super::mask_phone(phone)));
    }
    let premises = match get("premises") {
        "" => Premises::default(),
        t => Premises::parse(t).ok_or_else(|| format!("premises: {t:?} must be commercial or residential"))?,
    };
    let position = LatLon::parse(get("lat"), get("lon"))?;
    Ok(Row {
        line,
        site: site.to_owned(),
        device: device.to_owned(),
        kind,
        location: location.to_owned(),
        install_date,
        last_inspection,
        interval_months,
        crew: crew.to_owned(),
        phone: phone.to_owned(),
        premises,
        position,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "site,device,kind,location,install_date,last_inspection,inspection_interval_months,crew,phone\n";

    #[test]
    fn good_and_bad_rows_are_told_apart_with_line_numbers() {
        let text = format!(
            "{HEADER}\
             xuhui,xuhui-gas-0,gas_detector,\"Wanping Rd 12, kitchen\",2024-03-01,2025-12-20,12,crew-7,13812345678\n\
             xuhui,xuhui-gas-1,gas_detektor,Wanping Rd 14,2024-03-01,,,crew-7,13812345678\n\
             xuhui,xuhui-smoke-0,smoke_detector,Garage B2,2024-03-01,2024-02-01,,crew-7,13812345678\n\
             xuhui,xuhui-siren-0,siren_mount,Roof,2023-05-01,2025-09-01,6,crew-9,021-6432-1234\n\
             xuhui,xuhui-gas-0,gas_detector,dup,2024-03-01,,,crew-7,13812345678\n\
             xuhui,bad id,gas_detector,x,2024-03-01,,,crew-7,13812345678\n\
             xuhui,x-1,gas_detector,x,2024-13-01,,,crew-7,13812345678\n\
             xuhui,x-2,gas_detector,x,2024-03-01,,0,crew-7,13812345678\n\
             xuhui,x-3,gas_detector,x,2024-03-01,,,crew-7,call me\n\
             xuhui,x-4,gas_detector,x,2024-03-01\n\
             \n\
             xuhui,x-5,gas_detector,,2024-03-01,,,crew-7,13812345678\n"
        );
        let (rows, errors) = parse_inventory(text.as_bytes());
        let devices: Vec<&str> = rows.iter().map(|r| r.device.as_str()).collect();
        assert_eq!(devices, ["xuhui-gas-0", "xuhui-siren-0"]);
        assert_eq!(rows[0].location, "Wanping Rd 12, kitchen");
        assert_eq!(rows[0].line, 2);
        assert_eq!(rows[1].interval_months, Some(6));
        let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4, 6, 7, 8, 9, 10, 11, 13], "{errors:?}");
        assert!(errors[0].reason.starts_with("kind:"), "{errors:?}");
        assert!(errors[1].reason.starts_with("last_inspection: before"), "{errors:?}");
        assert!(errors[2].reason.contains("already on line 2"), "{errors:?}");
        assert!(errors[7].reason.contains("fields"), "{errors:?}");
        assert_eq!(errors[8].reason, "location: required");
    }

    #[test]
    fn header_problems_are_line_one() {
        assert_eq!(parse_inventory(b"").1[0].line, 1);
        let (_, e) = parse_inventory(b"site,device\nx,y\n");
        assert!(e[0].reason.contains("missing column"), "{e:?}");
        let (_, e) = parse_inventory(HEADER.replace("crew", "team").as_bytes());
        assert!(e[0].reason.contains("unknown column \"team\""), "{e:?}");
    }

    #[test]
    fn columns_in_any_order_with_premises_and_a_bom() {
        let text = "\u{feff}phone,crew,premises,inspection_interval_months,last_inspection,install_date,location,kind,device,site\n\
                    13812345678,crew-1,residential,,,2022-01-01,Flat 3,gas_detector,g-1,minhang\n";
        let (rows, errors) = parse_inventory(text.as_bytes());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(rows[0].premises, Premises::Residential);
        assert_eq!(rows[0].site, "minhang");
    }

    #[test]
    fn positions_are_optional_wgs84_degrees() {
        let head = HEADER.trim_end().to_owned() + ",lat,lon\n";
        let text = format!(
            "{head}s,d-1,gas_detector,x,2024-03-01,,,c,13812345678,31.1883,121.4365\n\
             s,d-2,gas_detector,x,2024-03-01,,,c,13812345678,,\n\
             s,d-3,gas_detector,x,2024-03-01,,,c,13812345678,91,121\n\
             s,d-4,gas_detector,x,2024-03-01,,,c,13812345678,31.2,\n\
             s,d-5,gas_detector,x,2024-03-01,,,c,13812345678,31.2,NaN\n"
        );
        let (rows, errors) = parse_inventory(text.as_bytes());
        assert_eq!(rows.len(), 2, "{errors:?}");
        assert_eq!(rows[0].position, Some(LatLon { lat: 31.1883, lon: 121.4365 }));
        assert_eq!(rows[1].position, None);
        let reasons: Vec<&str> = errors.iter().map(|e| e.reason.as_str()).collect();
        assert!(reasons[0].starts_with("lat:") && reasons[1].starts_with("lon:") && reasons[2].starts_with("lon:"), "{reasons:?}");
    }

    #[test]
    fn a_bad_phone_is_not_repeated_in_the_error() {
        let text = format!("{HEADER}s,d,gas_detector,x,2024-03-01,,,c,1381234567890123456\n");
        let (_, errors) = parse_inventory(text.as_bytes());
        assert!(!errors[0].reason.contains("1381234567890123456"), "{errors:?}");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_inventory(&bytes);
        }

        #[test]
        fn never_panics_after_a_good_header(tail in "[ -~\n\",]{0,300}") {
            let _ = parse_inventory(format!("{HEADER}{tail}").as_bytes());
        }
    }
}

