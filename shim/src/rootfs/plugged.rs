//! Layer-chain disks plugged into one VM, shared by that VM's containers of one image.
//!
//! A container's read-only layers are a shared erofs image (`cache.rs`); when a second
//! container of the same image starts in the pod (a sidecar of the same image, a scaled
//! worker, `spry upgrade` back to an image still running), it mounts the disk the first
//! one already has instead of hot-plugging the same file again: no QMP round trip, no
//! SCSI probe in the guest, and the guest's page cache of the image is shared. The disk
//! is unplugged when its last container goes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::vm::ScsiAddr;

/// The shared layer disks of one VM, by image path.
#[derive(Debug, Clone, Default)]
pub struct PluggedLayers {
    disks: Arc<Mutex<HashMap<PathBuf, Plugged>>>,
}

#[derive(Debug)]
struct Plugged {
    addr: ScsiAddr,
    users: usize,
}

impl PluggedLayers {
    fn disks(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Plugged>> {
        // The map holds plain data; a panic elsewhere cannot leave it half-updated.
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The disk already plugged for `image`, counted as one more user.
    pub fn reuse(&self, image: &Path) -> Option<ScsiAddr> {
        let mut disks = self.disks();
        let plugged = disks.get_mut(image)?;
        plugged.users += 1;
        Some(plugged.addr)
    }

    /// Records `addr` as the disk of `image`, with one user. False when another attach
    /// plugged the same image meanwhile: then `addr` stays the caller's own disk.
    pub fn add(&self, image: &Path, addr: ScsiAddr) -> bool {
        let mut disks = self.disks();
        if disks.contains_key(image) {
            return false;
        }
        disks.insert(image.to_path_buf(), Plugged { addr, users: 1 });
        true
    }

    /// One user of `image`'s disk fewer: its address when that was the last user (the
    /// caller unplugs it), else `None`.
    pub fn release(&self, image: &Path) -> Option<ScsiAddr> {
        let mut disks = self.disks();
        let plugged = disks.get_mut(image)?;
        plugged.users -= 1;
        if plugged.users > 0 {
            return None;
        }
        disks.remove(image).map(|p| p.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ScsiAddr = ScsiAddr { target: 2, lun: 0 };
    const B: ScsiAddr = ScsiAddr { target: 3, lun: 0 };

    #[test]
    fn the_last_user_unplugs() {
        let plugged = PluggedLayers::default();
        let image = Path::new("/state/layer-images/k.erofs");
        assert_eq!(plugged.reuse(image), None);
        assert!(plugged.add(image, A));
        assert_eq!(plugged.reuse(image), Some(A));
        assert_eq!(plugged.reuse(image), Some(A));
        assert_eq!(plugged.release(image), None);
        assert_eq!(plugged.release(image), None);
        assert_eq!(plugged.release(image), Some(A));
        // Gone: the next container plugs it again.
        assert_eq!(plugged.reuse(image), None);
        assert_eq!(plugged.release(image), None);
    }

    #[test]
    fn a_second_plug_of_one_image_stays_its_callers_own() {
        let plugged = PluggedLayers::default();
        let image = Path::new("/state/layer-images/k.erofs");
        assert!(plugged.add(image, A));
        assert!(!plugged.add(image, B));
        assert_eq!(plugged.reuse(image), Some(A));
    }

    #[test]
    fn images_are_counted_apart() {
        let plugged = PluggedLayers::default();
        let (x, y) = (Path::new("/x.erofs"), Path::new("/y.erofs"));
        assert!(plugged.add(x, A));
        assert!(plugged.add(y, B));
        assert_eq!(plugged.release(x), Some(A));
        assert_eq!(plugged.reuse(y), Some(B));
    }
}
