//! Shared by the real-VM and guest-assets tests: the pinned kernel (cached in
//! `<repo>/build/guest/cache`, like scripts/build-guest.sh) and a test
//! initramfs whose /init is a busybox script standing in for the agent.
#![allow(dead_code)]

pub mod vms;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use spry_shim::assets::initramfs::{initramfs_archive, InitramfsSpec};
use spry_shim::assets::kernel::{fetch_kernel_deb, prepare_kernel, KernelDeb, PreparedKernel};
use spry_shim::assets::modules::{ModuleDeps, GUEST_MODULES};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn cache_dir() -> PathBuf {
    repo_root().join("build/guest/cache")
}

/// The pinned kernel package, fetched once per test binary.
pub fn kernel_deb() -> &'static KernelDeb {
    static DEB: OnceLock<KernelDeb> = OnceLock::new();
    DEB.get_or_init(|| {
        fetch_kernel_deb(&cache_dir()).expect("fetching the pinned kernel (needs apt access)")
    })
}

pub fn kernel() -> &'static PreparedKernel {
    static KERNEL: OnceLock<PreparedKernel> = OnceLock::new();
    KERNEL.get_or_init(|| prepare_kernel(kernel_deb(), &cache_dir()).expect("preparing the kernel"))
}

pub fn busybox() -> PathBuf {
    let path = PathBuf::from("/bin/busybox");
    let output = std::process::Command::new("file").arg(&path).output();
    assert!(
        path.exists(),
        "the tests need busybox-static (apt-get install busybox-static)"
    );
    if let Ok(output) = output {
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            !text.contains("dynamically linked"),
            "/bin/busybox must be busybox-static: {text}"
        );
    }
    path
}

/// The test guest's /init. It loads the module list exactly as the agent
/// does, then prints markers the tests wait for:
/// - `SPRY-TEST-INIT` when /init runs, `SPRY-MODULES-LOADED` after insmod;
/// - answers `ping X` with `pong X` on the `spry.agent` virtio-serial port, and
///   `flood X` with `flooding X`, then writes to its console as fast as it can: a
///   hostile guest;
/// - `SPRY-DISK <h:c:t:l> <dev> <content of /spry-hello>` for each new SCSI
///   disk (mounted as erofs), `SPRY-DISK-GONE <h:c:t:l>` when one goes.
pub const TEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
echo SPRY-TEST-INIT
release=$(uname -r)
for m in $(cat /lib/modules/spry-modules.list); do
    insmod /lib/modules/$release/$m || echo "SPRY-INSMOD-FAILED $m"
done
echo SPRY-MODULES-LOADED
(
    while :; do
        for p in /sys/class/virtio-ports/*; do
            [ "$(cat $p/name 2>/dev/null)" = spry.agent ] || continue
            exec 3<>/dev/${p##*/}
            while read -r word arg <&3; do
                [ "$word" = ping ] && echo "pong $arg" >&3
                if [ "$word" = flood ]; then
                    echo "flooding $arg" >&3
                    if [ "$arg" = zero ]; then
                        cat /dev/zero > /dev/ttyS0 &
                    else
                        yes SPRY-FLOOD-0123456789abcdef0123456789abcdef > /dev/ttyS0 &
                    fi
                fi
            done
        done
        sleep 0.1
    done
) &
known=""
while :; do
    now=""
    for d in /sys/bus/scsi/devices/*:*:*:*; do
        [ -d "$d/block" ] || continue
        addr=${d##*/}
        now="$now $addr"
        case " $known " in *" $addr "*) continue ;; esac
        dev=$(ls $d/block)
        mkdir -p /mnt/$addr
        if mount -t erofs -o ro /dev/$dev /mnt/$addr 2>/dev/null; then
            echo "SPRY-DISK $addr $dev $(cat /mnt/$addr/spry-hello)"
            umount /mnt/$addr
        else
            echo "SPRY-DISK $addr $dev unmountable"
        fi
    done
    for addr in $known; do
        case " $now " in *" $addr "*) ;; *) echo "SPRY-DISK-GONE $addr" ;; esac
    done
    known=$now
    sleep 0.05
done
"#;

/// Writes the test initramfs (busybox + [`TEST_INIT`] + the guest modules)
/// into `dir` and returns its path.
pub fn test_initramfs(dir: &Path) -> PathBuf {
    let kernel = kernel();
    let deps = ModuleDeps::parse(
        &std::fs::read_to_string(kernel.modules_dir.join("modules.dep")).unwrap(),
    )
    .unwrap();
    let modules = deps.resolve_load_order(GUEST_MODULES).unwrap();
    let init = dir.join("test-init");
    std::fs::write(&init, TEST_INIT).unwrap();
    let spec = InitramfsSpec {
        init: &init,
        release: &kernel.release,
        modules_dir: &kernel.modules_dir,
        modules: &modules,
    };
    let mut archive = initramfs_archive(&spec).unwrap();
    archive.add_dir("bin", 0o755).unwrap();
    archive.add_dir("mnt", 0o755).unwrap();
    archive
        .add_file("bin/busybox", 0o755, std::fs::read(busybox()).unwrap())
        .unwrap();
    let image = dir.join("test-initramfs.img");
    std::fs::write(&image, archive.to_bytes().unwrap()).unwrap();
    image
}

/// An erofs image holding `/spry-hello` with `content`.
pub fn erofs_image(dir: &Path, name: &str, content: &str) -> PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("spry-hello"), content).unwrap();
    let image = dir.join(format!("{name}.erofs"));
    let status = std::process::Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(&tree)
        .status()
        .expect("the tests need mkfs.erofs (apt-get install erofs-utils)");
    assert!(status.success(), "mkfs.erofs failed");
    image
}
