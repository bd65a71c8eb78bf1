//! `summary` templates: the placeholders a rule may use, checking a template when the pack
//! loads, filling it in when a signal is built, and numbers written for humans. No rule logic.

/// The placeholders a `summary` template may use.
pub const PLACEHOLDERS: [&str; 6] = ["value", "threshold", "metric", "device", "site", "rule"];

/// Every `{…}` is a known placeholder.
pub(super) fn check_template(template: &str) -> std::result::Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or("unclosed {")?;
        let key = &after[..close];
        if !PLACEHOLDERS.contains(&key) {
            return Err(format!("unknown placeholder {{{key}}}, expected one of: {}", PLACEHOLDERS.join(", ")));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Fills a `summary` template; absent values render as "-".
pub(crate) fn render(template: &str, fill: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        out.push_str(fill(&after[..close]).as_deref().unwrap_or("-"));
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// A value for humans: at most three decimals, no trailing zeros.
pub(crate) fn number(value: f64) -> String {
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}
