//! Produces eStargz layers: one gzip member per file chunk, a TOC member and
//! the footer. The output is still a valid gzip'd tar, so runtimes that do not
//! know eStargz pull it as a normal layer.

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::{
    footer,
    plan::{chunk_plan, HotRanges},
    toc::clean_name,
    toc::format_modtime,
    EntryType, EstargzError, Toc, TocEntry, TOC_TAR_NAME,
};

/// A tar entry to append: its header, full path, link target and PAX records.
#[derive(Debug, Clone)]
pub struct SourceEntry {
    pub header: tar::Header,
    pub path: Vec<u8>,
    pub link: Option<Vec<u8>>,
    pub pax: Vec<(String, Vec<u8>)>,
}

/// What the writer produced.
#[derive(Debug, Clone)]
pub struct WriterOutput {
    /// `sha256:` of the TOC JSON (the `toc.digest` annotation).
    pub toc_digest: String,
    /// `sha256:` of the uncompressed tar (the config's diff ID).
    pub diff_id: String,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// `sha256:` of the compressed blob.
    pub blob_digest: String,
    /// Size of the compressed blob.
    pub blob_size: u64,
}

/// Writes an eStargz blob to `W`.
pub struct EstargzWriter<W: Write> {
    out: W,
    written: u64,
    blob_hash: Sha256,
    diff_hash: Sha256,
    uncompressed: u64,
    member: Option<flate2::write::GzEncoder<Vec<u8>>>,
    chunk_size: u64,
    toc: Toc,
}

impl<W: Write> EstargzWriter<W> {
    /// A writer that splits regular files into chunks of `chunk_size` bytes.
    pub fn new(out: W, chunk_size: u64) -> Self {
        EstargzWriter {
            out,
            written: 0,
            blob_hash: Sha256::new(),
            diff_hash: Sha256::new(),
            uncompressed: 0,
            member: None,
            chunk_size: chunk_size.max(1),
            toc: Toc {
                version: 1,
                entries: Vec::new(),
            },
        }
    }

    /// Appends one entry; `data` must yield exactly the header's size for
    /// regular files and is not read otherwise.
    pub fn append(&mut self, entry: &SourceEntry, data: &mut dyn Read) -> Result<(), EstargzError> {
        self.append_hot(entry, data, &HotRanges::None)
    }

    /// [`Self::append`], cutting a regular file's chunks at the edges of `hot` and marking
    /// those chunks for prefetch.
    pub fn append_hot(
        &mut self,
        entry: &SourceEntry,
        data: &mut dyn Read,
        hot: &HotRanges,
    ) -> Result<(), EstargzError> {
        let Some(kind) = entry_type(&entry.header) else {
            // Global PAX headers and other metadata-only records carry nothing
            // a TOC can express; they are dropped.
            return Ok(());
        };
        let header_bytes = encode_header(entry).map_err(|source| EstargzError::Write { source })?;
        self.write_uncompressed(&header_bytes)?;

        let size = entry
            .header
            .size()
            .map_err(|source| EstargzError::ReadTar { source })?;
        let mut toc_entry = toc_entry_for(entry, kind, self.written);
        if kind != EntryType::Reg || size == 0 {
            self.toc.entries.push(toc_entry);
            return Ok(());
        }

        toc_entry.size = size as i64;
        let mut file_hash = Sha256::new();
        let mut done = 0u64;
        let mut reg_index = None;
        let mut buf = vec![0u8; 64 * 1024];
        for planned in chunk_plan(size, self.chunk_size, hot) {
            self.close_member()?;
            let this = planned.len;
            toc_entry.offset = self.written as i64;
            toc_entry.chunk_offset = done as i64;
            // The last chunk leaves chunkSize at 0 ("to the end"), as the Go writer does.
            toc_entry.chunk_size = if this == self.chunk_size || done + this < size {
                this as i64
            } else {
                0
            };
            toc_entry.prefetch = planned.hot;
            let mut chunk_hash = Sha256::new();
            let mut left = this;
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                data.read_exact(&mut buf[..want])
                    .map_err(|source| EstargzError::ReadTar { source })?;
                chunk_hash.update(&buf[..want]);
                file_hash.update(&buf[..want]);
                self.write_uncompressed(&buf[..want])?;
                left -= want as u64;
            }
            toc_entry.chunk_digest = format!("sha256:{}", hex::encode(chunk_hash.finalize()));
            if reg_index.is_none() {
                reg_index = Some(self.toc.entries.len());
            }
            self.toc.entries.push(toc_entry);
            toc_entry = TocEntry::new(
                clean_name(&String::from_utf8_lossy(&entry.path)),
                EntryType::Chunk,
            );
            done += this;
        }
        if let Some(idx) = reg_index {
            self.toc.entries[idx].digest = format!("sha256:{}", hex::encode(file_hash.finalize()));
        }
        let pad = (512 - size % 512) % 512;
        self.write_uncompressed(&vec![0u8; pad as usize])?;
        Ok(())
    }

    /// Writes the TOC member and the footer and returns the digests.
    pub fn finish(mut self) -> Result<(WriterOutput, W), EstargzError> {
        self.close_member()?;
        let toc_offset = self.written;
        let json =
            serde_json::to_vec(&self.toc).map_err(|source| EstargzError::TocJson { source })?;
        let toc_digest = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o444);
        header.set_size(json.len() as u64);
        // Explicit zeros: a NUL-filled numeric field is invalid to strict readers.
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        let entry = SourceEntry {
            header,
            path: TOC_TAR_NAME.as_bytes().to_vec(),
            link: None,
            pax: Vec::new(),
        };
        let header_bytes =
            encode_header(&entry).map_err(|source| EstargzError::Write { source })?;
        self.write_uncompressed(&header_bytes)?;
        self.write_uncompressed(&json)?;
        let pad = (512 - json.len() % 512) % 512;
        // Padding plus the two zero blocks that end the tar.
        self.write_uncompressed(&vec![0u8; pad + 1024])?;
        self.close_member()?;
        let footer = footer::encode(toc_offset);
        self.write_compressed(&footer)?;
        self.out
            .flush()
            .map_err(|source| EstargzError::Write { source })?;
        let output = WriterOutput {
            toc_digest,
            diff_id: format!("sha256:{}", hex::encode(self.diff_hash.finalize())),
            uncompressed_size: self.uncompressed,
            blob_digest: format!("sha256:{}", hex::encode(self.blob_hash.finalize())),
            blob_size: self.written,
        };
        Ok((output, self.out))
    }

    fn write_uncompressed(&mut self, data: &[u8]) -> Result<(), EstargzError> {
        if data.is_empty() {
            return Ok(());
        }
        let member = self.member.get_or_insert_with(|| {
            flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default())
        });
        member
            .write_all(data)
            .map_err(|source| EstargzError::Write { source })?;
        self.diff_hash.update(data);
        self.uncompressed += data.len() as u64;
        Ok(())
    }

    fn close_member(&mut self) -> Result<(), EstargzError> {
        if let Some(member) = self.member.take() {
            let bytes = member
                .finish()
                .map_err(|source| EstargzError::Write { source })?;
            self.write_compressed(&bytes)?;
        }
        Ok(())
    }

    fn write_compressed(&mut self, data: &[u8]) -> Result<(), EstargzError> {
        self.out
            .write_all(data)
            .map_err(|source| EstargzError::Write { source })?;
        self.blob_hash.update(data);
        self.written += data.len() as u64;
        Ok(())
    }
}

fn entry_type(h: &tar::Header) -> Option<EntryType> {
    use tar::EntryType as T;
    Some(match h.entry_type() {
        T::Regular | T::Continuous => EntryType::Reg,
        T::Directory => EntryType::Dir,
        T::Symlink => EntryType::Symlink,
        T::Link => EntryType::Hardlink,
        T::Char => EntryType::Char,
        T::Block => EntryType::Block,
        T::Fifo => EntryType::Fifo,
        _ => return None,
    })
}

/// The tar bytes of a header: PAX records first, then (GNU long name/link
/// records if needed and) the ustar header itself, with no data.
fn encode_header(entry: &SourceEntry) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    if !entry.pax.is_empty() {
        builder.append_pax_extensions(entry.pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    let mut header = entry.header.clone();
    let path = Path::new(std::ffi::OsStr::from_bytes(&entry.path));
    match &entry.link {
        Some(link) => builder.append_link(
            &mut header,
            path,
            Path::new(std::ffi::OsStr::from_bytes(link)),
        )?,
        None => builder.append_data(&mut header, path, io::empty())?,
    }
    let bytes = std::mem::take(builder.get_mut());
    Ok(bytes)
}

fn toc_entry_for(entry: &SourceEntry, kind: EntryType, offset: u64) -> TocEntry {
    let h = &entry.header;
    let mut e = TocEntry::new(clean_name(&String::from_utf8_lossy(&entry.path)), kind);
    e.offset = offset as i64;
    e.mode = h.mode().unwrap_or(0) as i64;
    e.uid = h.uid().unwrap_or(0) as i64;
    e.gid = h.gid().unwrap_or(0) as i64;
    e.user_name = h.username().ok().flatten().unwrap_or_default().to_string();
    e.group_name = h.groupname().ok().flatten().unwrap_or_default().to_string();
    e.modtime = format_modtime(h.mtime().unwrap_or(0) as i64);
    if let Some(link) = &entry.link {
        let link = String::from_utf8_lossy(link).into_owned();
        e.link_name = if kind == EntryType::Hardlink {
            clean_name(&link)
        } else {
            link
        };
    }
    if matches!(kind, EntryType::Char | EntryType::Block) {
        e.dev_major = h.device_major().ok().flatten().unwrap_or(0) as i64;
        e.dev_minor = h.device_minor().ok().flatten().unwrap_or(0) as i64;
    }
    for (key, value) in &entry.pax {
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            e.xattrs.insert(
                name.to_string(),
                base64::engine::general_purpose::STANDARD.encode(value),
            );
        }
    }
    e
}
