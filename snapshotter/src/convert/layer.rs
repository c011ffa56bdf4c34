//! Converts one tar layer into eStargz, moving prioritized files (and the
//! directories above them) to the front and marking the end of that region
//! with `.prefetch.landmark`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::estargz::{
    toc::clean_name, writer::SourceEntry, EstargzError, EstargzWriter, HotRanges, WriterOutput,
    DEFAULT_CHUNK_SIZE, LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
};

/// Errors converting a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerConvertError {
    #[error("failed to spool the source layer")]
    Spool { source: io::Error },
    #[error("failed to read the source tar")]
    ReadTar { source: io::Error },
    #[error("failed to write the eStargz layer")]
    Write { source: EstargzError },
}

/// Options of a layer conversion.
#[derive(Debug, Clone)]
pub struct LayerConvertOptions {
    pub chunk_size: u64,
    /// Paths (in the image) to put first, in this order.
    pub prioritized: Vec<String>,
    /// Bytes of files to mark for prefetch (`spryPrefetch`), by path. Empty: the layer's
    /// prefetch is everything before `.prefetch.landmark`, as stargz-snapshotter reads it.
    pub hot: HashMap<String, HotRanges>,
}

impl Default for LayerConvertOptions {
    fn default() -> Self {
        LayerConvertOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            prioritized: Vec::new(),
            hot: HashMap::new(),
        }
    }
}

struct Spooled {
    entry: SourceEntry,
    data_pos: u64,
    size: u64,
}

/// Converts the uncompressed tar `input` into eStargz written to `out`.
pub fn convert_tar<R: Read, W: Write>(
    mut input: R,
    out: W,
    opts: &LayerConvertOptions,
) -> Result<(WriterOutput, W), LayerConvertError> {
    // Reordering needs random access; spool to an anonymous temp file so
    // layers of any size fit.
    let mut spool = tempfile::tempfile().map_err(|source| LayerConvertError::Spool { source })?;
    io::copy(&mut input, &mut spool).map_err(|source| LayerConvertError::Spool { source })?;
    spool
        .seek(SeekFrom::Start(0))
        .map_err(|source| LayerConvertError::Spool { source })?;
    let entries = index_tar(&mut spool)?;

    let order = emit_order(&entries, &opts.prioritized);
    let mut writer = EstargzWriter::new(out, opts.chunk_size);
    let write_err = |source| LayerConvertError::Write { source };
    if order.prioritized_count == 0 {
        writer
            .append(
                &landmark(NO_PREFETCH_LANDMARK),
                &mut &[LANDMARK_CONTENTS][..],
            )
            .map_err(write_err)?;
    }
    for (n, idx) in order.indices.iter().enumerate() {
        if order.prioritized_count > 0 && n == order.prioritized_count {
            writer
                .append(&landmark(PREFETCH_LANDMARK), &mut &[LANDMARK_CONTENTS][..])
                .map_err(write_err)?;
        }
        let e = &entries[*idx];
        spool
            .seek(SeekFrom::Start(e.data_pos))
            .map_err(|source| LayerConvertError::Spool { source })?;
        let mut data = (&mut spool).take(e.size);
        let hot = opts
            .hot
            .get(&clean_name(&String::from_utf8_lossy(&e.entry.path)))
            .unwrap_or(&HotRanges::None);
        writer
            .append_hot(&e.entry, &mut data, hot)
            .map_err(write_err)?;
    }
    if order.prioritized_count > 0 && order.prioritized_count == order.indices.len() {
        writer
            .append(&landmark(PREFETCH_LANDMARK), &mut &[LANDMARK_CONTENTS][..])
            .map_err(write_err)?;
    }
    writer.finish().map_err(write_err)
}

fn index_tar(spool: &mut File) -> Result<Vec<Spooled>, LayerConvertError> {
    let read_err = |source| LayerConvertError::ReadTar { source };
    let mut archive = tar::Archive::new(spool);
    let mut out = Vec::new();
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let mut pax = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(read_err)? {
            for ext in exts {
                let ext = ext.map_err(read_err)?;
                let key = ext.key().map_err(|_| {
                    read_err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "PAX key is not UTF-8",
                    ))
                })?;
                pax.push((key.to_string(), ext.value_bytes().to_vec()));
            }
        }
        let path = entry.path_bytes().into_owned();
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let size = entry.header().entry_size().map_err(read_err)?;
        out.push(Spooled {
            entry: SourceEntry {
                header: entry.header().clone(),
                path,
                link,
                pax,
            },
            data_pos: entry.raw_file_position(),
            size,
        });
    }
    Ok(out)
}

struct Order {
    indices: Vec<usize>,
    prioritized_count: usize,
}

fn emit_order(entries: &[Spooled], prioritized: &[String]) -> Order {
    let by_name: HashMap<String, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (clean_name(&String::from_utf8_lossy(&e.entry.path)), i))
        .collect();
    let mut taken = HashSet::new();
    let mut indices = Vec::new();
    for want in prioritized {
        let name = clean_name(want);
        let Some(&idx) = by_name.get(&name) else {
            continue;
        };
        // Parent directories first, then a hard link's target, then the file.
        let mut parents: Vec<String> = Vec::new();
        let mut cur = name.as_str();
        while let Some((parent, _)) = cur.rsplit_once('/') {
            parents.push(parent.to_string());
            cur = parent;
        }
        let mut wanted: Vec<usize> = parents
            .iter()
            .rev()
            .filter_map(|p| by_name.get(p).copied())
            .collect();
        if entries[idx].entry.header.entry_type() == tar::EntryType::Link {
            if let Some(target) = &entries[idx].entry.link {
                if let Some(&t) = by_name.get(&clean_name(&String::from_utf8_lossy(target))) {
                    wanted.push(t);
                }
            }
        }
        wanted.push(idx);
        for i in wanted {
            if taken.insert(i) {
                indices.push(i);
            }
        }
    }
    let prioritized_count = indices.len();
    indices.extend((0..entries.len()).filter(|i| !taken.contains(i)));
    Order {
        indices,
        prioritized_count,
    }
}

fn landmark(name: &str) -> SourceEntry {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(1);
    // Explicit zeros: a NUL-filled numeric field is invalid to strict readers.
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    SourceEntry {
        header,
        path: name.as_bytes().to_vec(),
        link: None,
        pax: Vec::new(),
    }
}
