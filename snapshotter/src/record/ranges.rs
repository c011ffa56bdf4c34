//! The reads a recorded workload made, file by file: what `lazy.record_accesses` writes to
//! `<snapshot>/accessed-ranges.txt` and `convert --prefetch-ranges` reads, one
//! `OFFSET LENGTH PATH` line per read (the path last: it may hold spaces).

use std::collections::HashMap;

use crate::convert::LayerConvertOptions;
use crate::estargz::{toc::clean_name, HotRanges};

/// The converter's options: the `prioritized` files first, then the files `ranges` saw read.
/// Without `ranges`, the layers prefetch everything before their landmark (whole files, as
/// stargz-snapshotter does); with it, only the bytes read, plus the `prioritized` files whole.
pub fn convert_options(
    chunk_size: u64,
    prioritized: &[String],
    ranges: Option<ReadRanges>,
) -> LayerConvertOptions {
    let Some(ranges) = ranges else {
        return LayerConvertOptions {
            chunk_size,
            prioritized: super::prioritized_list(prioritized, &[]),
            hot: HashMap::new(),
        };
    };
    let order = super::prioritized_list(prioritized, ranges.paths());
    let mut hot = ranges.into_hot();
    for path in prioritized {
        hot.insert(clean_name(path), HotRanges::Whole);
    }
    LayerConvertOptions {
        chunk_size,
        prioritized: order,
        hot,
    }
}

/// Errors in a ranges file.
#[derive(Debug, thiserror::Error)]
pub enum RangesError {
    #[error(
        "line {line}: {reason}; each line is OFFSET LENGTH PATH (decimal bytes, path in the image)"
    )]
    Line { line: usize, reason: &'static str },
}

/// Byte ranges read per file, files in the order of their first read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReadRanges {
    order: Vec<String>,
    ranges: HashMap<String, Vec<(u64, u64)>>,
}

impl ReadRanges {
    /// Parses a ranges file; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, RangesError> {
        let mut out = ReadRanges::default();
        for (n, line) in text.lines().enumerate() {
            let err = |reason| RangesError::Line {
                line: n + 1,
                reason,
            };
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(3, ' ');
            let (Some(offset), Some(len), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(err("fewer than three fields"));
            };
            let offset: u64 = offset.parse().map_err(|_| err("OFFSET is not a number"))?;
            let len: u64 = len.parse().map_err(|_| err("LENGTH is not a number"))?;
            let end = offset
                .checked_add(len)
                .ok_or_else(|| err("OFFSET + LENGTH overflows"))?;
            let path = clean_name(path);
            if path.is_empty() {
                return Err(err("PATH is empty"));
            }
            out.add(path, offset, end);
        }
        Ok(out)
    }

    /// Adds a read of `[start, end)` of `path`.
    pub(crate) fn add(&mut self, path: String, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let list = self.ranges.entry(path.clone()).or_insert_with(|| {
            self.order.push(path);
            Vec::new()
        });
        list.push((start, end));
    }

    /// Adds `other`'s reads after this one's.
    pub fn extend(&mut self, other: ReadRanges) {
        let ReadRanges { order, mut ranges } = other;
        for path in order {
            for (start, end) in ranges.remove(&path).unwrap_or_default() {
                self.add(path.clone(), start, end);
            }
        }
    }

    /// Bytes read, each byte once however often it was read.
    pub fn bytes(&self) -> u64 {
        self.ranges
            .values()
            .map(|list| {
                let mut list = list.clone();
                list.sort_unstable();
                let (mut total, mut covered) = (0, 0);
                for (start, end) in list {
                    let start = start.max(covered);
                    if end > start {
                        total += end - start;
                        covered = end;
                    }
                }
                total
            })
            .sum()
    }

    /// The files read, first read first.
    pub fn paths(&self) -> &[String] {
        &self.order
    }

    /// What the converter marks hot in each file: the ranges read. Overlaps and neighbours
    /// are merged when the chunks are planned.
    pub fn into_hot(self) -> HashMap<String, HotRanges> {
        self.ranges
            .into_iter()
            .map(|(path, ranges)| (path, HotRanges::Ranges(ranges)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_grouped_per_file_in_first_read_order() {
        let text = "# recorded\n0 4096 usr/lib/libc.so.6\n8192 131072 ./usr/bin/python3\n\n4096 4096 usr/lib/libc.so.6\n0 0 etc/empty\n0 10 my dir/a file\n";
        let ranges = ReadRanges::parse(text).unwrap();
        assert_eq!(ranges.bytes(), 8192 + 131_072 + 10);
        assert_eq!(
            ranges.paths(),
            ["usr/lib/libc.so.6", "usr/bin/python3", "my dir/a file"]
        );
        let hot = ranges.into_hot();
        assert_eq!(
            hot["usr/lib/libc.so.6"],
            HotRanges::Ranges(vec![(0, 4096), (4096, 8192)])
        );
        assert_eq!(
            hot["usr/bin/python3"],
            HotRanges::Ranges(vec![(8192, 139_264)])
        );
        assert!(!hot.contains_key("etc/empty"));
    }

    #[test]
    fn explicit_files_come_first_and_are_prefetched_whole() {
        let ranges = ReadRanges::parse("0 10 bin/sh\n0 10 etc/a\n").unwrap();
        let opts = convert_options(
            1000,
            &["./etc/a".into(), "app".into()],
            Some(ranges.clone()),
        );
        assert_eq!(opts.prioritized, ["etc/a", "app", "bin/sh"]);
        assert_eq!(opts.hot["etc/a"], HotRanges::Whole);
        assert_eq!(opts.hot["app"], HotRanges::Whole);
        assert_eq!(opts.hot["bin/sh"], HotRanges::Ranges(vec![(0, 10)]));
        let plain = convert_options(1000, &["app".into()], None);
        assert_eq!(plain.prioritized, ["app"]);
        assert!(plain.hot.is_empty());
    }

    #[test]
    fn a_bad_line_is_named() {
        for (text, line) in [
            ("0 1 a\nx 1 b\n", 2),
            ("0 1\n", 1),
            ("18446744073709551615 1 a\n", 1),
            ("0 1 /\n", 1),
            ("-1 1 a\n", 1),
        ] {
            match ReadRanges::parse(text) {
                Err(RangesError::Line { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                Ok(r) => panic!("{text:?} parsed: {r:?}"),
            }
        }
    }
}
