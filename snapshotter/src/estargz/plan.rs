//! Where the writer cuts a regular file into chunks, and which chunks it marks for
//! prefetch (`spryPrefetch` in the TOC).
//!
//! A recorded workload reads parts of files, not whole files (python imports read a
//! module's header and the code it runs; a shared library is mapped and only some pages
//! fault in). Cutting the file at the edges of what was read lets the prefetch fetch just
//! those bytes: each read range becomes chunks of its own, the rest of the file cold chunks.

/// Which bytes of one file the layer asks to prefetch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HotRanges {
    /// None: the file is cut every `chunk_size` bytes and nothing is marked.
    #[default]
    None,
    /// The whole file (an explicitly prioritized file).
    Whole,
    /// These byte ranges (`[start, end)`, any order, may overlap or pass the end).
    Ranges(Vec<(u64, u64)>),
}

/// Read ranges are widened to whole pages: the kernel reads pages, and a range ending
/// mid-page would leave the rest of that page to a cold chunk.
const PAGE: u64 = 4096;
/// Hot ranges closer than this are joined: a separate gzip member (and TOC entry, and
/// possibly request) costs more than fetching the few bytes between them.
pub const JOIN_GAP: u64 = 16 << 10;
/// Cold parts of a file that has hot ranges are cut this small (or at the chunk size if
/// smaller): a read the recording did not see then fetches little.
pub const COLD_CHUNK: u64 = 512 << 10;

/// One chunk of the plan: its length and whether it is marked for prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedChunk {
    pub len: u64,
    pub hot: bool,
}

/// The chunks of a file of `size` bytes, in file order; their lengths sum to `size`.
pub fn chunk_plan(size: u64, chunk_size: u64, hot: &HotRanges) -> Vec<PlannedChunk> {
    let chunk_size = chunk_size.max(1);
    match hot {
        HotRanges::None => split(0, size, chunk_size, false),
        HotRanges::Whole => split(0, size, chunk_size, true),
        HotRanges::Ranges(ranges) => {
            let spans = normalize(ranges, size);
            if spans.is_empty() {
                return split(0, size, chunk_size, false);
            }
            let cold = chunk_size.min(COLD_CHUNK);
            let mut plan = Vec::new();
            let mut at = 0;
            for (start, end) in spans {
                plan.extend(split(at, start, cold, false));
                plan.extend(split(start, end, chunk_size, true));
                at = end;
            }
            plan.extend(split(at, size, cold, false));
            plan
        }
    }
}

/// Pieces of at most `max` bytes covering `[start, end)`.
fn split(start: u64, end: u64, max: u64, hot: bool) -> Vec<PlannedChunk> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let len = (end - at).min(max);
        out.push(PlannedChunk { len, hot });
        at += len;
    }
    out
}

/// Sorted, disjoint, page-aligned spans within `[0, size)`, joined across gaps under
/// [`JOIN_GAP`].
fn normalize(ranges: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|(start, end)| start < end && *start < size)
        .map(|&(start, end)| {
            let start = start / PAGE * PAGE;
            let end = end.min(size).div_ceil(PAGE).saturating_mul(PAGE).min(size);
            (start, end)
        })
        .collect();
    spans.sort_unstable();
    let mut joined: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match joined.last_mut() {
            Some(last) if start <= last.1.saturating_add(JOIN_GAP) => last.1 = last.1.max(end),
            _ => joined.push((start, end)),
        }
    }
    // A cold piece shorter than a join gap at either end of the file goes to the hot span.
    if let Some(first) = joined.first_mut() {
        if first.0 < JOIN_GAP {
            first.0 = 0;
        }
    }
    if let Some(last) = joined.last_mut() {
        if size - last.1 < JOIN_GAP {
            last.1 = size;
        }
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(plan: &[PlannedChunk]) -> Vec<(u64, bool)> {
        plan.iter().map(|c| (c.len, c.hot)).collect()
    }

    #[test]
    fn without_hot_ranges_files_are_cut_at_the_chunk_size() {
        assert_eq!(
            lens(&chunk_plan(10, 4, &HotRanges::None)),
            [(4, false), (4, false), (2, false)]
        );
        assert_eq!(
            lens(&chunk_plan(8, 4, &HotRanges::Whole)),
            [(4, true), (4, true)]
        );
        assert!(chunk_plan(0, 4, &HotRanges::Whole).is_empty());
    }

    #[test]
    fn read_ranges_become_hot_chunks_of_their_own() {
        let mib = 1 << 20;
        // A 3 MiB file read at 1 MiB + 100 .. + 5000 and at its last byte.
        let plan = chunk_plan(
            3 * mib,
            4 * mib,
            &HotRanges::Ranges(vec![(mib + 100, mib + 5000), (3 * mib - 1, 3 * mib)]),
        );
        assert_eq!(
            lens(&plan),
            [
                (COLD_CHUNK, false),
                (COLD_CHUNK, false),
                (2 * PAGE, true),
                (COLD_CHUNK, false),
                (COLD_CHUNK, false),
                (COLD_CHUNK, false),
                (COLD_CHUNK - 3 * PAGE, false),
                (PAGE, true),
            ]
        );
        assert_eq!(plan.iter().map(|c| c.len).sum::<u64>(), 3 * mib);
        let hot: Vec<(u64, u64)> = offsets(&plan)
            .into_iter()
            .filter(|&(_, _, hot)| hot)
            .map(|(s, e, _)| (s, e))
            .collect();
        assert_eq!(hot, [(mib, mib + 2 * PAGE), (3 * mib - PAGE, 3 * mib)]);
    }

    #[test]
    fn close_ranges_join_and_ranges_past_the_end_are_clamped() {
        let plan = chunk_plan(
            100_000,
            1 << 20,
            &HotRanges::Ranges(vec![
                (40_000, 41_000),
                (30_000, 31_000),
                (50_000, 1 << 40),
                (200_000, 300_000),
                (7, 7),
            ]),
        );
        let hot: Vec<(u64, u64)> = offsets(&plan)
            .into_iter()
            .filter(|&(_, _, hot)| hot)
            .map(|(s, e, _)| (s, e))
            .collect();
        // 28672..100000: the three ranges joined (gaps under 16 KiB), up to the end.
        assert_eq!(hot, [(28_672, 100_000)]);
        assert_eq!(plan.iter().map(|c| c.len).sum::<u64>(), 100_000);
        // Empty and out-of-file ranges only: nothing hot.
        assert!(
            chunk_plan(10, 4, &HotRanges::Ranges(vec![(20, 30), (3, 3)]))
                .iter()
                .all(|c| !c.hot)
        );
    }

    fn offsets(plan: &[PlannedChunk]) -> Vec<(u64, u64, bool)> {
        let mut at = 0;
        plan.iter()
            .map(|c| {
                at += c.len;
                (at - c.len, at, c.hot)
            })
            .collect()
    }
}
