//! The TOC (`stargz.index.json`) as the eStargz spec defines it, with the
//! same JSON field names as the Go implementation so layers interoperate.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The table of contents of one eStargz layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Toc {
    pub version: u32,
    pub entries: Vec<TocEntry>,
}

/// Entry kinds of a TOC, as spelled in the JSON.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    Chunk,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// One TOC entry: a file, or one additional chunk of a regular file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub modtime: String,
    #[serde(default, rename = "linkName", skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: i64,
    #[serde(default, rename = "userName", skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(
        default,
        rename = "groupName",
        skip_serializing_if = "String::is_empty"
    )]
    pub group_name: String,
    #[serde(default, rename = "devMajor", skip_serializing_if = "is_zero")]
    pub dev_major: i64,
    #[serde(default, rename = "devMinor", skip_serializing_if = "is_zero")]
    pub dev_minor: i64,
    /// Extended attributes; values are base64 in the JSON (Go `[]byte`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// sha256 of the whole file content (regular files only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Offset in the compressed blob of the gzip member holding this entry's data.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: i64,
    #[serde(default, rename = "chunkOffset", skip_serializing_if = "is_zero")]
    pub chunk_offset: i64,
    /// Size of this chunk; 0 means "to the end of the file".
    #[serde(default, rename = "chunkSize", skip_serializing_if = "is_zero")]
    pub chunk_size: i64,
    #[serde(
        default,
        rename = "chunkDigest",
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_digest: String,
    #[serde(default, rename = "innerOffset", skip_serializing_if = "is_zero")]
    pub inner_offset: i64,
    /// Spry's extension: the workload recorded at conversion read this chunk before it was
    /// ready (`convert --prefetch-ranges`), so a mount prefetches it. Other eStargz readers
    /// ignore unknown fields; the TOC's digest covers it like every other field.
    #[serde(default, rename = "spryPrefetch", skip_serializing_if = "is_false")]
    pub prefetch: bool,
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl TocEntry {
    /// An entry with only the name and type set.
    pub fn new(name: impl Into<String>, kind: EntryType) -> Self {
        TocEntry {
            name: name.into(),
            kind,
            size: 0,
            modtime: String::new(),
            link_name: String::new(),
            mode: 0,
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: String::new(),
            offset: 0,
            chunk_offset: 0,
            chunk_size: 0,
            chunk_digest: String::new(),
            inner_offset: 0,
            prefetch: false,
        }
    }
}

/// Normalizes a tar/TOC path the way the eStargz reader does: no leading
/// `./` or `/`, no trailing `/`, `.` and `..` resolved lexically.
pub fn clean_name(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// Seconds since the epoch of an RFC 3339 timestamp as Go writes it
/// (`2006-01-02T15:04:05Z` or with a `+hh:mm` offset, optional fraction).
pub fn parse_modtime(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" => 0,
        r if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) => {
            let h: i64 = r.get(1..3)?.parse().ok()?;
            let m: i64 = r.get(4..6)?.parse().ok()?;
            let sign = if r.starts_with('-') { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    Some(days_from_civil(year, month, day) * 86400 + hour * 3600 + min * 60 + sec - offset)
}

/// Formats seconds since the epoch as RFC 3339 UTC.
pub fn format_modtime(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

// Howard Hinnant's civil calendar algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_names() {
        assert_eq!(clean_name("./usr/bin/"), "usr/bin");
        assert_eq!(clean_name("/etc//passwd"), "etc/passwd");
        assert_eq!(clean_name("./"), "");
        assert_eq!(clean_name("a/../b"), "b");
    }

    #[test]
    fn modtime_roundtrip() {
        assert_eq!(parse_modtime("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_modtime("2023-05-06T07:08:09Z"), Some(1683356889));
        assert_eq!(parse_modtime("2023-05-06T09:08:09+02:00"), Some(1683356889));
        assert_eq!(parse_modtime("2023-05-06T07:08:09.123Z"), Some(1683356889));
        assert_eq!(format_modtime(1683356889), "2023-05-06T07:08:09Z");
        assert_eq!(parse_modtime("yesterday"), None);
    }

    #[test]
    fn toc_json_uses_go_field_names() {
        let mut e = TocEntry::new("bin/sh", EntryType::Reg);
        e.chunk_digest = "sha256:00".into();
        e.size = 5;
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"name":"bin/sh","type":"reg","size":5,"chunkDigest":"sha256:00"}"#
        );
        let back: TocEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
    }
}
