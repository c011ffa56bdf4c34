//! The mounts under a volume's bind in the pod's file share. The guest sees the share as
//! one FUSE file system, with no boundary where the host has a mount under a volume's
//! source; so for a plain read-only (`ro`) volume, whose mounts under it stay writable
//! under runc, the agent is given each of them as a bind of its own, with its own flag.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// More mounts than this under one volume are not repeated in the guest (the volume is then
/// read-only as a whole there, the safe side): a container that binds a host tree with
/// hundreds of mounts should not turn each into a guest mount.
pub const MAX_SUBMOUNTS: usize = 64;

/// A mount under a volume's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submount {
    /// Its mount point, relative to the volume's root (normal components only).
    pub relative: PathBuf,
    pub readonly: bool,
}

/// The mounts strictly under `root` in `mountinfo` (the text of /proc/<pid>/mountinfo),
/// parents before children, leaving out those hidden by a later mount on them or on a
/// directory above them. None when there are more than [`MAX_SUBMOUNTS`].
pub fn under(mountinfo: &str, root: &Path) -> Option<Vec<Submount>> {
    let mut found: Vec<Submount> = Vec::new();
    for line in mountinfo.lines() {
        let mut fields = line.split(' ');
        let (Some(mount_point), Some(options)) = (fields.nth(4), fields.next()) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape(mount_point));
        let Ok(relative) = mount_point.strip_prefix(root) else {
            continue;
        };
        // A mount here covers whatever was mounted at or under this point before it.
        found.retain(|m| !m.relative.starts_with(relative));
        if relative.as_os_str().is_empty() {
            continue;
        }
        found.push(Submount {
            relative: relative.to_path_buf(),
            readonly: options.split(',').any(|o| o == "ro"),
        });
        if found.len() > MAX_SUBMOUNTS {
            return None;
        }
    }
    found.sort_by_key(|m| m.relative.components().count());
    Some(found)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and tab, newline, backslash).
fn unescape(field: &str) -> OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let digits = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: u32, mount_point: &str, options: &str) -> String {
        format!("{id} 1 0:{id} / {mount_point} {options} shared:1 - tmpfs none rw\n")
    }

    #[test]
    fn mounts_under_the_root_come_parents_first_with_their_flags() {
        let text = [
            line(20, "/", "rw"),
            line(30, "/share/c/0", "ro,nosuid"),
            line(31, "/share/c/0/d/e", "rw"),
            line(32, "/share/c/0/a", "rw,relatime"),
            line(33, "/share/c/01", "rw"),
            line(35, "/share/c/0/a/b", "ro"),
            line(34, "/share/c/1/x", "rw"),
        ]
        .concat();
        let found = under(&text, Path::new("/share/c/0")).unwrap();
        assert_eq!(
            found,
            [
                Submount {
                    relative: "a".into(),
                    readonly: false
                },
                Submount {
                    relative: "d/e".into(),
                    readonly: false
                },
                Submount {
                    relative: "a/b".into(),
                    readonly: true
                },
            ]
        );
    }

    #[test]
    fn a_mount_made_later_over_a_directory_hides_what_was_under_it() {
        let text = [
            line(30, "/v", "rw"),
            line(31, "/v/a/b", "rw"),
            line(32, "/v/a", "ro"),
            line(33, "/v/c", "rw"),
            line(34, "/v/c", "ro"),
        ]
        .concat();
        let found = under(&text, Path::new("/v")).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|m| (m.relative.display().to_string(), m.readonly))
            .collect();
        assert_eq!(names, [("a".into(), true), ("c".into(), true)]);
        // A mount on the volume's root itself hides everything that was under it.
        let text = [line(31, "/v/a", "rw"), line(32, "/v", "ro")].concat();
        assert_eq!(under(&text, Path::new("/v")).unwrap(), []);
    }

    #[test]
    fn escaped_mount_points_are_read_back() {
        let text = line(31, "/v/with\\040space\\134and\\011tab", "rw");
        let found = under(&text, Path::new("/v")).unwrap();
        assert_eq!(found[0].relative, Path::new("with space\\and\ttab"));
        assert_eq!(unescape("plain\\09"), OsString::from("plain\\09"));
        assert_eq!(unescape("end\\"), OsString::from("end\\"));
    }

    #[test]
    fn too_many_mounts_are_not_repeated_and_garbage_is_skipped() {
        let text: String = (0..=MAX_SUBMOUNTS as u32)
            .map(|i| line(100 + i, &format!("/v/m{i}"), "rw"))
            .collect();
        assert_eq!(under(&text, Path::new("/v")), None);
        let garbage = "\n1 2\nnot a mountinfo line at all\n";
        assert_eq!(under(garbage, Path::new("/v")).unwrap(), []);
    }
}
